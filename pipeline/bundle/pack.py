"""Pass 2 of the bundle: render one window's samples and write its shards into a local folder.

One pack task per window of input shards (`plan.py`). The task reads its inputs through `ShardSet` (any
storage URI) one parquet row group at a time, only the needed columns, rendering the samples it plans as it
goes into a local spill file; then it writes each of its shards in planned order into the task's local folder
and returns them with their index rows and stats. The executor commits them (pipeline/bundle/stage.py).
Memory: one persons row group + the window's face rows + a few bytes per sample; Ray is told
`bundle.pack_memory_mb`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.bundle.plan import Planned, ShardSet
from pipeline.bundle.render import RenderError, face_npy, render_sample, visible_mask
from pipeline.bundle.writers import DEFAULT_WRITER, OutputWriter, locations
from pipeline.config import BuildConfig, BundleConfig
from pipeline.stage import config_hash
from schemas.bundle import BUNDLE_INDEX

log = logging.getLogger(__name__)

PERSON_COLS = ["person_id", "sample_id", "detection_index", "name", "url", "image_sha256", "box", "box_score",
               "keypoints_crop", "crop"]
FACE_COLS = ["person_id", "face_box", "face_landmarks", "face_score", "feature", "feature_dim"]
ROW_GROUP_WARN_BYTES = 128 << 20


def pipeline_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("webbody")
    except PackageNotFoundError:
        return "0+unknown"


def build_config_hash(cfg: BuildConfig) -> str:
    # `run` says where the work runs, not what it makes: it must not change the records' bytes. The user-stage
    # fields (plugins, extensions) enter only when used, so builds made before they existed keep their hash.
    doc = cfg.model_dump(mode="json", exclude={"run"})
    for key in ("plugins", "extensions"):
        if not doc[key]:
            del doc[key]
    if doc["bundle"]["writer"] == DEFAULT_WRITER:  # the same: bundles made before writers were registered
        del doc["bundle"]["writer"]
    return config_hash(doc)


def iter_wanted_rows(shards: ShardSet, sid: str, columns: list[str], wanted: set[str]):
    """The rows of shard `sid` whose person_id is in `wanted`, one row group at a time (column subset only).

    The person_id column of a row group is read first, so row groups without a wanted row cost no crop bytes.
    """
    if not shards.is_done(sid):
        return
    import pyarrow.parquet as pq

    with shards.store.open(shards.parquet_name(sid)) as fh:
        shards.check_size(sid, fh.seek(0, 2))
        fh.seek(0)
        pf = pq.ParquetFile(fh)
        for rg in range(pf.num_row_groups):
            ids = pf.read_row_group(rg, columns=["person_id"]).column("person_id")
            mask = pc.is_in(ids, value_set=pa_array(wanted))
            if not pc.any(mask).as_py():
                continue
            size = pf.metadata.row_group(rg).total_byte_size
            if size > ROW_GROUP_WARN_BYTES:
                log.warning("bundle: %s row group %d holds %d MB (more than the 128 MB this stage plans for)",
                            shards.parquet_name(sid), rg, size >> 20)
            yield from pf.read_row_group(rg, columns=columns).filter(mask).to_pylist()


def pa_array(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), pa.string())


def pack_window(folder: Path, shards: dict[str, list[Planned]], persons: str, faces: str, bcfg: BundleConfig,
                version: str, cfg_hash: str, writer: OutputWriter, vouched: dict[str, dict[str, int]] | None = None,
                ) -> tuple[pa.Table, dict[str, Path], dict[str, dict]]:
    """Render one window's samples and write its shards `shards` (name -> planned samples, in order) into the
    local `folder`. Pure function of its arguments; returns the window's index rows, the shard files and each
    shard's stats. `vouched`: the input shards' sizes whose markers planning checked (no listing, no marker
    read here)."""
    vouched = vouched or {}
    pset, fset = ShardSet(persons, vouched.get("persons")), ShardSet(faces, vouched.get("faces"))
    by_input: dict[str, dict[str, Planned]] = {}
    for planned in shards.values():
        for p in planned:
            by_input.setdefault(p.in_shard, {})[p.person_id] = p
    drops: dict[str, Counter] = {s: Counter() for s in shards}
    outside: Counter = Counter()
    # person_id -> (spill offset, [(ext, size, sha256)], meta): rendered bytes wait on local disk, not in memory
    rendered: dict[str, tuple[int, list[tuple[str, int, str]], dict]] = {}
    with tempfile.TemporaryFile(prefix="webbody-pack-", dir=folder) as spill:
        for sid in sorted(by_input):
            group = by_input[sid]
            faces_of = {r["person_id"]: r for r in iter_wanted_rows(fset, sid, FACE_COLS, set(group))}
            for person in iter_wanted_rows(pset, sid, PERSON_COLS, set(group)):
                p = group[person["person_id"]]
                face = faces_of.get(p.person_id)
                try:
                    jpg, meta, n_out = render_sample(person, face, p.__dict__, bcfg.image_size, bcfg.jpeg_quality,
                                                     version, cfg_hash)
                    members = [("jpg", jpg),
                               ("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())]
                    if bcfg.write_face_npy and face is not None:
                        members.append(("face.npy", face_npy(face["feature"], int(face["feature_dim"]))))
                except RenderError as exc:
                    drops[p.shard][exc.reason] += 1
                    log.warning("bundle %s: %s dropped (%s): %s", p.shard, p.person_id, exc.reason, exc)
                    continue
                outside[p.shard] += n_out
                at = spill.tell()
                # Hash each member here, with the rendering, so the shard writer below only writes bytes.
                spill.write(b"".join(d for _, d in members))
                rendered[p.person_id] = (at, [(e, len(d), hashlib.sha256(d).hexdigest()) for e, d in members], meta)
        tables, files, stats = [], {}, {}
        for shard, planned in shards.items():
            # planned but neither rendered nor dropped with a reason: the persons row is gone
            missing = sum(1 for p in planned if p.person_id not in rendered) - sum(drops[shard].values())
            if missing:
                drops[shard]["missing_person"] += missing
            files[shard] = folder / shard
            table, stats[shard] = _write_shard(writer, files[shard], shard, planned, rendered, spill, drops[shard],
                                               outside[shard])
            tables.append(table)
    index = pa.concat_tables(tables) if tables else BUNDLE_INDEX.empty()
    return index, files, stats


def _write_shard(writer: OutputWriter, path: Path, shard: str, planned: list[Planned], rendered: dict, spill: Any,
                 drops: Counter, outside: int) -> tuple[pa.Table, dict]:
    samples = [p for p in planned if p.person_id in rendered]
    digest = hashlib.sha256()
    with open(path, "wb", buffering=1 << 20) as fh:
        sink = writer.sink(_Hashing(fh, digest))
        rows = []
        for pos, p in enumerate(samples):
            at, parts, meta = rendered[p.person_id]
            spill.seek(at)
            placed = sink.add(p.key, [(ext, spill.read(size), sha) for ext, size, sha in parts])
            rows.append({
                "key": p.key, "split": p.split, "shard": shard, "position": pos, **locations(placed, sink.offset),
                "class_id": p.class_id, "identity": p.identity, "name": meta["name"], "role": p.role,
                "subsets": p.subsets, "person_id": p.person_id, "sample_id": meta["sample_id"],
                "url": meta["url"], "image_sha256": meta["image_sha256"],
                "kp_visible": visible_mask(meta["keypoints"]), "has_face": meta["face_box"] is not None,
            })
        sink.close()
    table = BUNDLE_INDEX.from_rows(rows) if rows else BUNDLE_INDEX.empty()
    stats = {"split": planned[0].split if planned else "", "planned": len(planned), "samples": len(rows),
             "drops": dict(sorted(drops.items())), "keypoints_outside_frame": outside, "bytes": sink.offset,
             "sha256": digest.hexdigest()}
    return table, stats


class _Hashing:
    """A write-only file that hashes what passes through (the shard's sha256 without reading it back)."""

    def __init__(self, fh: Any, digest: Any):
        self._fh, self._digest = fh, digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._fh.write(data)
