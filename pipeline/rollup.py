"""Roll shard stats up into a directory's `stats.json`, and stage roll-ups into a build's funnel."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.shards import DatasetDir, atomic_write_json


def write_rollup(out: DatasetDir, stage: str, expected_ids: list[str]) -> dict:
    """Sum the stats of every finished shard. `complete` says whether all expected shards are done."""
    rows_in = rows_out = 0
    drops: Counter = Counter()
    seconds = 0.0
    done = [sid for sid in expected_ids if out.is_done(sid)]
    for sid in done:
        st = out.shard_stats(sid)
        rows_in += st["rows_in"]
        rows_out += st["rows_out"]
        drops.update(st["drops"])
        seconds += st.get("seconds", 0.0)
    stats = {
        "stage": stage,
        "shards": len(expected_ids),
        "shards_done": len(done),
        "complete": len(done) == len(expected_ids),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "drops": dict(sorted(drops.items())),
        "seconds": round(seconds, 3),
    }
    if stats["complete"]:
        atomic_write_json(out.root / "stats.json", stats)
    return stats


def read_stats(directory: str | Path) -> dict | None:
    p = Path(directory) / "stats.json"
    return json.loads(p.read_text()) if p.exists() else None


def write_funnel(build_root: Path, stage_dirs: dict[str, Path]) -> dict:
    """The run-level funnel: one entry per finished stage, in pipeline order, plus the headline counts."""
    stages = []
    for name, d in stage_dirs.items():
        st = read_stats(d)
        if st is None:
            continue
        entry = {k: st.get(k) for k in ("rows_in", "rows_out", "drops", "seconds")}
        entry.update({"stage": name, "dir": str(Path(d).relative_to(build_root))})
        for extra in ("identities", "funnel"):
            if extra in st:
                entry[extra] = st[extra]
        stages.append(entry)
    funnel = {"stages": stages}
    atomic_write_json(build_root / "stats.json", funnel)
    return funnel
