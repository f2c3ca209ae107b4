"""Pass 2 of the bundle: render and pack each window's shards, then write `index.parquet` and `stats.json`.

One pack task per window of input shards (`plan.py`). The task reads its inputs through `ShardSet`
(any storage URI) one parquet row group at a time, only the needed columns, rendering the samples it plans
as it goes into a local spill file; then it writes each of its shards in planned order (tar, then the index
part, then the stats marker last: `layout.py`). Memory: one persons row group + the window's face rows +
a few bytes per sample; Ray is told `bundle.pack_memory_mb`. A killed run resumes: a shard whose tar and
parts agree is kept, the others are written again (the window's inputs are read again for them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from pipeline.bundle.layout import (
    Ledger,
    claim,
    clean_temporaries,
    discard_outputs,
    key_hash,
    part_index,
    part_stats,
    read_shard_stats,
    removed_hashes,
    sibling_funnel,
    summarize,
    write_centers,
)
from pipeline.bundle.plan import Planned, ShardSet, build_plan
from pipeline.bundle.render import RenderError, face_npy, render_sample, visible_mask
from pipeline.bundle.store import Store, as_store
from pipeline.bundle.tarpack import ShardWriter
from pipeline.config import BuildConfig, BundleConfig
from pipeline.progress import progress
from pipeline.stage import StageError, config_hash
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


def pack_window(out_dir: str, shards: dict[str, list[Planned]], persons_dir: str, faces_dir: str,
                bcfg: BundleConfig, version: str, cfg_hash: str,
                vouched: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Render one window's samples and write its shards `shards` (name -> planned samples, in order).

    Pure function of its arguments (runs as a Ray task); returns each shard's stats. `vouched`: the input
    shards' sizes whose markers planning checked (`BundlePlan.vouched_for`); without it the task lists the
    inputs and reads their markers itself.
    """
    t0 = time.perf_counter()
    out = as_store(out_dir)
    vouched = vouched or {}
    pset, fset = ShardSet(persons_dir, vouched.get("persons")), ShardSet(faces_dir, vouched.get("faces"))
    by_input: dict[str, dict[str, Planned]] = {}
    for planned in shards.values():
        for p in planned:
            by_input.setdefault(p.in_shard, {})[p.person_id] = p
    drops: dict[str, Counter] = {s: Counter() for s in shards}
    outside: Counter = Counter()
    # person_id -> (spill offset, [(ext, size, sha256)], meta): rendered bytes wait on local disk, not in memory
    rendered: dict[str, tuple[int, list[tuple[str, int, str]], dict]] = {}
    with tempfile.TemporaryFile(prefix="webbody-pack-") as spill:
        for sid in sorted(by_input):
            group = by_input[sid]
            faces = {r["person_id"]: r for r in iter_wanted_rows(fset, sid, FACE_COLS, set(group))}
            for person in iter_wanted_rows(pset, sid, PERSON_COLS, set(group)):
                p = group[person["person_id"]]
                face = faces.get(p.person_id)
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
        results = []
        for shard, planned in shards.items():
            # planned but neither rendered nor dropped with a reason: the persons row is gone
            missing = sum(1 for p in planned if p.person_id not in rendered) - sum(drops[shard].values())
            if missing:
                drops[shard]["missing_person"] += missing
            results.append(_write_shard(out, shard, planned, rendered, spill, drops[shard], outside[shard], t0))
    return results


def _write_shard(out: Store, shard: str, planned: list[Planned], rendered: dict, spill: Any, drops: Counter,
                 outside: int, t0: float) -> dict:
    samples = [p for p in planned if p.person_id in rendered]
    digest = hashlib.sha256()

    def fill(fh) -> tuple[list[dict], int]:
        writer = ShardWriter(_Hashing(fh, digest))
        rows = []
        for pos, p in enumerate(samples):
            at, parts, meta = rendered[p.person_id]
            spill.seek(at)
            members = [(ext, spill.read(size), sha) for ext, size, sha in parts]
            m = {mem_in[0]: mem for mem_in, mem in zip(members, writer.add(p.key, members))}
            npy = m.get("face.npy")
            rows.append({
                "key": p.key, "split": p.split, "shard": shard, "position": pos,
                "offset": m["jpg"].offset, "end": writer.offset,
                "jpg_offset": m["jpg"].data_offset, "jpg_size": m["jpg"].size,
                "json_offset": m["json"].data_offset, "json_size": m["json"].size,
                "npy_offset": npy.data_offset if npy else None, "npy_size": npy.size if npy else None,
                "member_sha256": m["jpg"].sha256, "json_sha256": m["json"].sha256, "npy_sha256": npy.sha256 if npy else None,
                "class_id": p.label, "identity": p.identity, "name": meta["name"], "role": p.role,
                "subsets": p.subsets, "person_id": p.person_id, "sample_id": meta["sample_id"],
                "url": meta["url"], "image_sha256": meta["image_sha256"],
                "kp_visible": visible_mask(meta["keypoints"]), "has_face": meta["face_box"] is not None,
            })
        writer.close()
        return rows, writer.offset

    rows, size = out.write_with(shard, fill)
    table = BUNDLE_INDEX.from_rows(rows) if rows else BUNDLE_INDEX.empty()
    stats = {"shard": shard, "split": planned[0].split if planned else "", "planned": len(planned),
             "samples": len(rows), "drops": dict(sorted(drops.items())), "keypoints_outside_frame": outside,
             "bytes": size, "sha256": digest.hexdigest(), "seconds": round(time.perf_counter() - t0, 3)}
    out.write_parquet(part_index(shard), table)
    out.write_json(part_stats(shard), stats)  # written last: the shard's marker
    return stats


class _Hashing:
    """A write-only file that hashes what passes through (the shard's sha256 without reading it back)."""

    def __init__(self, fh: Any, digest: Any):
        self._fh, self._digest = fh, digest

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self._fh.write(data)


def run_bundle(cfg: BuildConfig, inputs: dict[str, str | Path], output: str | Path, overwrite: bool = False) -> dict:
    for need in ("clean", "persons", "faces"):
        if need not in inputs:
            raise StageError(f"bundle needs the '{need}' output (inputs: {sorted(inputs)})")
    t0 = time.perf_counter()
    bcfg = cfg.bundle
    plan = build_plan(bcfg, inputs["clean"], inputs["persons"], inputs["faces"])
    version, chash = pipeline_version(), build_config_hash(cfg)
    meta = {"stage": "bundle", "config_hash": chash, "plan": plan.digest(), "version": version}
    out = as_store(output)
    out.makedirs()
    clean_temporaries(out)
    files = out.listing()  # one listing answers the claim, the opt-out check and which shards are done
    if claim(out, meta, overwrite, files):
        discard_outputs(out)
        files = out.listing()
    shards = plan.by_shard()
    # Opt-outs applied by `webbody remove` stay applied: their samples are never written again. Filtering after
    # the shard assignment keeps every other sample in the shard and position it already has.
    removed = removed_hashes(out, files)
    if removed["keys"]:
        shards = {s: [p for p in ps if key_hash(p.key) not in removed["keys"]] for s, ps in shards.items()}
        shards = {s: ps for s, ps in shards.items() if ps}
        for ident in [i for i in plan.centers if key_hash(i) in removed["identities"]]:
            del plan.centers[ident]
    ledger = Ledger(out, files)
    tasks = []
    for _, names in sorted(plan.windows().items()):
        todo = {s: shards[s] for s in names if s in shards and not ledger.shard_done(s)}
        if todo:
            tasks.append(todo)
    args = (str(inputs["persons"]), str(inputs["faces"]), bcfg, version, chash)
    bar = progress(total=sum(len(t) for t in tasks), desc="bundle", unit="shard")
    written: dict[str, dict] = {}  # shard -> the stats its pack task returned (no need to read them back)

    def packed(results: list[dict]) -> None:
        written.update((r["shard"], r) for r in results)
        bar.update(len(results))

    if tasks and cfg.run.executor == "ray" and len(tasks) > 1:
        import ray

        from pipeline.runtime import init_ray

        init_ray(cfg.run.ray_address)
        # memory= makes Ray place no more pack tasks on a node than its memory holds (row group + window faces)
        remote = ray.remote(num_cpus=1, memory=bcfg.pack_memory_mb << 20)(pack_window)
        pending = [remote.remote(out.uri, t, *args, plan.vouched_for(t)) for t in tasks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            packed(ray.get(ready[0]))
    else:
        for t in tasks:
            packed(pack_window(out.uri, t, *args, plan.vouched_for(t)))
    bar.close()
    earlier = read_shard_stats(out, [s for s in shards if s not in written])  # done by an earlier run
    shard_stats = sorted([*earlier, *(written[s] for s in shards if s in written)], key=lambda st: st["shard"])
    write_centers(out, plan.centers)
    extra = {
        "rows_in": plan.rows_in,
        "plan_drops": dict(plan.drops),
        "pipeline_version": version,
        "config_hash": chash,
        "plan": meta["plan"],
        "image_size": bcfg.image_size,
        "split_plan": plan.splits.stats,
        "funnel": sibling_funnel(out),
        "removals": {"requests": 0, "samples": 0},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return summarize(out, shard_stats, extra)
