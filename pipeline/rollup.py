"""Roll shard stats up into a directory's `stats.json`, and stage roll-ups into a build's funnel."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.shards import ROLLUP, DatasetDir


def _read_stats(out: DatasetDir, ids: list[str]) -> list[dict]:
    if out.is_local or len(ids) < 8:
        return [out.shard_stats(s) for s in ids]
    # Object stores: one GET per shard, so issue them concurrently (latency, not bandwidth, bounds them).
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(out.shard_stats, ids))


def write_rollup(out: DatasetDir, stage: str, expected_ids: list[str], run_info: dict | None = None,
                 write: bool = True, refresh: bool = True) -> dict:
    """Sum the stats of every finished shard. `complete` says whether all expected shards are done.

    `refresh`: list the directory again first (workers in other processes committed shards since the
    caller's listing). `run_info` (how the latest invocation went: units run, resubmitted, timed out) goes
    under `run`. With `write`, a complete roll-up is written to `stats.json`.
    """
    if refresh:
        out.refresh()
    rows_in = rows_out = 0
    drops: Counter = Counter()
    seconds = 0.0
    done = [sid for sid in expected_ids if out.is_done(sid)]
    for st in _read_stats(out, done):
        rows_in += st["rows_in"]
        rows_out += st["rows_out"]
        drops.update(st["drops"])
        seconds += st.get("seconds", 0.0)
    stats: dict[str, Any] = {
        "stage": stage,
        "shards": len(expected_ids),
        "shards_done": len(done),
        "complete": len(done) == len(expected_ids),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "drops": dict(sorted(drops.items())),
        "seconds": round(seconds, 3),
    }
    if run_info is not None:
        stats["run"] = {k: v for k, v in run_info.items() if k != "first_error"}
    if stats["complete"] and write:
        out.write_json(ROLLUP, stats)
    return stats


def read_stats(directory: str | os.PathLike | DatasetDir) -> dict | None:
    d = directory if isinstance(directory, DatasetDir) else DatasetDir(directory)
    return d.read_json(ROLLUP) if d.has(ROLLUP, refresh=True) else None


def write_funnel(build_root: str | os.PathLike, stage_dirs: dict[str, Any]) -> dict:
    """The run-level funnel: one entry per finished stage, in pipeline order, plus the headline counts."""
    root = os.fspath(build_root)
    stages = []
    for name, d in stage_dirs.items():
        st = read_stats(d)
        if st is None:
            continue
        entry = {k: st.get(k) for k in ("rows_in", "rows_out", "drops", "seconds")}
        entry.update({"stage": name, "dir": _relative(os.fspath(d.uri if isinstance(d, DatasetDir) else d), root)})
        for extra in ("identities", "funnel"):
            if extra in st:
                entry[extra] = st[extra]
        stages.append(entry)
    funnel = {"stages": stages}
    storage.put_json(storage.join(root, ROLLUP), funnel)
    return funnel


def _relative(path: str, root: str) -> str:
    if storage.is_local(path) and storage.is_local(root):
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    return path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path
