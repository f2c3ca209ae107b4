"""The bundle directory's layout and ledger: which files exist, when a shard counts as done, the roll-ups.

Layout of a bundle directory (a local folder or an object-store prefix):
  webbody-{split}-{n:06d}.tar   the shards (each written atomically: temp + rename, or one PUT)
  _parts/<shard>.parquet         the shard's index rows, written after its tar
  _parts/<shard>.json            the shard's stats: samples, drops, bytes, sha256 -- written last, the marker
  _stage.json                    config hash + plan digest: a rerun with another plan is refused
  _removed.json                  sha256 of keys/identities removed by `webbody remove` (never written again)
  index.parquet, centers.parquet, stats.json   written once every shard is done

Both the stage (`writer`) and `remove` depend on this module; it depends on neither (issue #17: the
writer <-> remove import cycle is gone). Completion is found from ONE listing of `_parts/` plus one listing
of the folder (names and sizes), never a stat per shard.
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
PARTS = "_parts"


def shard_file(split: str, n: int) -> str:
    return f"webbody-{split}-{n:06d}.tar"


def part_index(shard: str) -> str:
    return f"{PARTS}/{shard}.parquet"


def part_stats(shard: str) -> str:
    return f"{PARTS}/{shard}.json"


def key_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Ledger:
    """What one listing of a bundle folder says: the tars and parts present, with sizes."""

    def __init__(self, store: Store, files: dict[str, int] | None = None):
        self.store = store
        self.files = store.listing() if files is None else files
        self.parts = store.listing(PARTS)

    def shard_done(self, shard: str) -> bool:
        """The tar, its index part and its stats marker all exist and the marker names the tar's size."""
        if shard not in self.files or f"{shard}.parquet" not in self.parts or f"{shard}.json" not in self.parts:
            return False
        try:
            info = self.store.read_json(part_stats(shard))
        except (OSError, ValueError):
            return False
        return info.get("bytes") == self.files[shard]


def read_shard_stats(store: Store, shards: list[str]) -> list[dict]:
    return [store.read_json(part_stats(s)) for s in sorted(shards)]


def claim(store: Store, meta: dict, overwrite: bool, files: dict[str, int] | None = None) -> bool:
    """Record in `_stage.json` which config and plan own this bundle; True when an older owner's files must go.

    The same rule as `pipeline.shards.claim_output`, over a Store so it also holds on object stores.
    `files`: the folder's listing when the caller has one (no request to ask whether `_stage.json` exists).
    """
    changed = False
    if "_stage.json" in (store.listing() if files is None else files):
        old = store.read_json("_stage.json")
        if old != meta:
            if not overwrite:
                raise StageError(f"{store} holds output of {old}, but this run is {meta}: use a new output "
                                 "directory, or pass overwrite=True (--overwrite) to redo it (another selection or "
                                 "config)")
            changed = True
    store.write_json("_stage.json", meta)
    return changed


def discard_outputs(store: Store) -> None:
    """Delete what an earlier owner of the folder wrote (shards, parts, roll-ups, report)."""
    for name in store.listing():
        if name.startswith("webbody-") and name.endswith(".tar") or name in (
                "index.parquet", "centers.parquet", "stats.json", "report.html"):
            store.delete(name)
    for name in store.listing(PARTS):
        store.delete(f"{PARTS}/{name}")


def clean_temporaries(store: Store) -> None:
    """Local runs leave `.name.tmp` files when killed; object stores never see a partial object."""
    if not store.local:
        return
    for sub in ("", PARTS):
        for name in store.listing(sub):
            if name.startswith(".") and name.endswith(".tmp"):
                store.delete(f"{sub}/{name}" if sub else name)


def removed_hashes(out: str | Store, files: dict[str, int] | None = None) -> dict[str, set[str]]:
    store = as_store(out)
    data = store.read_json("_removed.json") if "_removed.json" in (
        store.listing() if files is None else files) else {}
    return {"keys": set(data.get("keys", [])), "identities": set(data.get("identities", []))}


def sibling_funnel(out: str | Store) -> list[dict]:
    """Rows in/out and drops of every earlier stage found beside the bundle (`<build>/<stage>/stats.json`)."""
    from pipeline.registry import stage_names

    build = as_store(out).parent()
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


def write_centers(out: str | Store, centers: dict[str, tuple[np.ndarray, int, str]]) -> None:
    rows = [{"identity": i, "center": c.astype("<f4").tobytes(), "dim": int(c.size), "count": n, "embedder": e}
            for i, (c, n, e) in sorted(centers.items())]
    as_store(out).write_parquet("centers.parquet", BUNDLE_CENTERS.from_rows(rows) if rows else BUNDLE_CENTERS.empty())


def center_matrix(out: str | Store) -> tuple[list[str], np.ndarray, list[str]]:
    """(identities, L2-normalised centers, embedder per identity) from centers.parquet."""
    store = as_store(out)
    if not store.exists("centers.parquet"):
        raise StageError(f"{store.url('centers.parquet')} not found: this bundle has no identity centers "
                         "(rebuild it with this version)")
    t = pq.read_table(io.BytesIO(store.read_bytes("centers.parquet"))).to_pylist()
    if not t:
        return [], np.zeros((0, 0), np.float32), []
    mat = np.stack([np.frombuffer(r["center"], dtype="<f4") for r in t]).astype(np.float32)
    mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
    return [r["identity"] for r in t], mat, [r["embedder"] for r in t]


def summarize(out: str | Store, shard_stats: list[dict], extra: dict) -> dict:
    """index.parquet from the parts, and stats.json. Also used by `remove` after rewriting shards."""
    store = as_store(out)
    parts = [pq.read_table(io.BytesIO(store.read_bytes(part_index(s["shard"])))) for s in shard_stats]
    index = pa.concat_tables([BUNDLE_INDEX.validate(p) for p in parts]) if parts else BUNDLE_INDEX.empty()
    store.write_parquet("index.parquet", index)
    drops: Counter = Counter(extra.get("plan_drops", {}))
    for s in shard_stats:
        drops.update(s["drops"])
    per_split: dict[str, Any] = {}
    for split in SPLITS:
        sub = index.filter(pc.equal(index.column("split"), split))
        per_split[split] = {
            "samples": sub.num_rows,
            "identities": len(pc.unique(sub.column("identity"))),
            "shards": sum(1 for s in shard_stats if s["split"] == split),
            "classes": (pc.max(sub.column("class_id")).as_py() + 1) if sub.num_rows else 0,
        }
    per_split["test"]["queries"] = int(pc.sum(pc.equal(index.column("role"), "query")).as_py() or 0)
    per_split["test"]["gallery"] = int(pc.sum(pc.equal(index.column("role"), "gallery")).as_py() or 0)
    stats = {
        **{k: v for k, v in extra.items() if k != "plan_drops"},
        "stage": "bundle",
        "rows_out": index.num_rows,
        "drops": dict(sorted(drops.items())),
        "identities": len(pc.unique(index.column("identity"))),
        "splits": per_split,
        "shards": {s["shard"]: {k: s[k] for k in ("split", "samples", "bytes", "sha256")} for s in shard_stats},
        "bytes": sum(s["bytes"] for s in shard_stats),
        "keypoints_outside_frame": sum(s.get("keypoints_outside_frame", 0) for s in shard_stats),
        "complete": True,
    }
    store.write_json("stats.json", stats)  # the same JSON options as pipeline.shards.atomic_write_json
    return stats
