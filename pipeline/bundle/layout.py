"""The bundle directory's layout and its roll-up: names, the index and stats built from the pack tasks' parts.

The bundle is a `PlannedStage` (pipeline/bundle/stage.py): the executor claims the folder, commits each pack
task (window) and writes the roll-up, so the folder follows the stage contract (pipeline/shards.py):

  webbody-{split}-{n:06d}.tar   the shards (extra objects of their window's commit, written before its marker)
  part-NNNNN.parquet            window NNNNN's index rows (the rows of every shard it wrote)
  part-NNNNN.stats.json         the window's stats, with `tars`: per shard split, samples, drops, bytes, sha256
  part-NNNNN.done               the window's marker (last): parquet size/sha256 and each shard's size/sha256
  _stage.json                   stage, config hash, inputs' fingerprint (another config is refused)
  _removed.json                 sha256 of keys/identities removed by `webbody remove` (never written again)
  index.parquet, centers.parquet (the stage's `finish`), stats.json (the executor's roll-up + the bundle's fields)

Both the stage and `remove` depend on this module; it depends on neither (issue #17: no writer <-> remove
import cycle).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bundle.store import Store, as_store
from pipeline.stage import StageError
from schemas.bundle import BUNDLE_CENTERS, BUNDLE_INDEX

SPLITS = ("train", "test")
REMOVED = "_removed.json"
INDEX = "index.parquet"
CENTERS = "centers.parquet"


def shard_file(split: str, n: int, extension: str = "tar") -> str:
    return f"webbody-{split}-{n:06d}.{extension}"


def key_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def removed_hashes(out: Any, files: dict[str, int] | None = None) -> dict[str, Any]:
    """`_removed.json` of a bundle (a Store, a DatasetDir or a location): hashed keys and identities, requests."""
    store = as_store(getattr(out, "uri", out))
    data = store.read_json(REMOVED) if REMOVED in (store.listing() if files is None else files) else {}
    return {"keys": set(data.get("keys", [])), "identities": set(data.get("identities", [])),
            "requests": int(data.get("requests", 0))}


def sibling_funnel(out: Any) -> list[dict]:
    """Rows in/out and drops of every earlier stage found beside the bundle (`<build>/<stage>/stats.json`)."""
    from pipeline.registry import stage_names

    build = as_store(getattr(out, "uri", out)).parent()
    rows = []
    for name in stage_names():
        if name == "bundle":
            continue
        try:
            st = build.child(name).read_json("stats.json")
        except FileNotFoundError:
            continue
        rows.append({"stage": name, "rows_in": st.get("rows_in"), "rows_out": st.get("rows_out"),
                     "drops": st.get("drops", {}), **({"identities": st["identities"]} if "identities" in st else {})})
    return rows


def parquet_bytes(table: pa.Table) -> bytes:
    """The bytes of a parquet object, with the fixed writer options of pipeline.shards (same rows, same bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=True, write_statistics=True)
    return buf.getvalue()


def centers_table(centers: dict[str, tuple[np.ndarray, int, str]]) -> pa.Table:
    rows = [{"identity": i, "center": c.astype("<f4").tobytes(), "dim": int(c.size), "count": n, "embedder": e}
            for i, (c, n, e) in sorted(centers.items())]
    return BUNDLE_CENTERS.from_rows(rows) if rows else BUNDLE_CENTERS.empty()


def center_matrix(out: str | Store) -> tuple[list[str], np.ndarray, list[str]]:
    """(identities, L2-normalised centers, embedder per identity) from centers.parquet."""
    store = as_store(out)
    if not store.exists(CENTERS):
        raise StageError(f"{store.url(CENTERS)} not found: this bundle has no identity centers "
                         "(rebuild it with this version)")
    t = pq.read_table(io.BytesIO(store.read_bytes(CENTERS))).to_pylist()
    if not t:
        return [], np.zeros((0, 0), np.float32), []
    mat = np.stack([np.frombuffer(r["center"], dtype="<f4") for r in t]).astype(np.float32)
    mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
    return [r["identity"] for r in t], mat, [r["embedder"] for r in t]


def index_of(parts: list[pa.Table]) -> pa.Table:
    """index.parquet's table from the windows' parts: rows by shard name, then position, one chunk per shard
    (the chunking the index had when it was concatenated from per-shard parts: the same parquet bytes)."""
    if not parts:
        return BUNDLE_INDEX.empty()
    t = pa.concat_tables([BUNDLE_INDEX.validate(p) for p in parts])
    if not t.num_rows:
        return BUNDLE_INDEX.empty()
    t = t.sort_by([("shard", "ascending"), ("position", "ascending")])
    shards = t.column("shard").to_pylist()
    cuts = [i for i in range(1, len(shards)) if shards[i] != shards[i - 1]]
    return pa.concat_tables([t.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, len(shards)])])


def summarize(index: pa.Table, tars: dict[str, dict], extra: dict) -> dict:
    """The bundle's roll-up fields from its index and its shards' stats (`tars`); also used by `remove`."""
    drops: Counter = Counter(extra.get("plan_drops", {}))
    for s in tars.values():
        drops.update(s.get("drops", {}))
    per_split: dict[str, Any] = {}
    for split in SPLITS:
        sub = index.filter(pc.equal(index.column("split"), split))
        per_split[split] = {
            "samples": sub.num_rows,
            "identities": len(pc.unique(sub.column("identity"))),
            "shards": sum(1 for s in tars.values() if s["split"] == split),
            "classes": (pc.max(sub.column("class_id")).as_py() + 1) if sub.num_rows else 0,
        }
    per_split["test"]["queries"] = int(pc.sum(pc.equal(index.column("role"), "query")).as_py() or 0)
    per_split["test"]["gallery"] = int(pc.sum(pc.equal(index.column("role"), "gallery")).as_py() or 0)
    return {
        **{k: v for k, v in extra.items() if k != "plan_drops"},
        "stage": "bundle",
        "rows_out": index.num_rows,
        "drops": dict(sorted(drops.items())),
        "identities": len(pc.unique(index.column("identity"))),
        "splits": per_split,
        "tars": {n: {k: s[k] for k in ("split", "samples", "bytes", "sha256")} for n, s in sorted(tars.items())},
        "bytes": sum(s["bytes"] for s in tars.values()),
        "keypoints_outside_frame": sum(s.get("keypoints_outside_frame", 0) for s in tars.values()),
    }


def listed_tars(stats: dict) -> dict[str, dict]:
    """The shards a bundle's stats.json lists (`tars`; bundles written before the executor port list them
    under `shards`, next to their `_parts/` folder)."""
    old = stats.get("shards")
    return stats.get("tars") or (old if isinstance(old, dict) else {})
