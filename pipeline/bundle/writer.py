"""Pass 2 of the bundle: render and pack each planned shard, then write `index.parquet` and `stats.json`.

Layout of a bundle directory:
  webbody-{split}-{n:06d}.tar   the shards (each written to a temporary name, then renamed)
  _parts/<shard>.parquet         the shard's index rows, written after its tar (the shard's completion marker)
  _parts/<shard>.json            the shard's stats: samples, drops, bytes, sha256
  _stage.json                    config hash + plan digest: a rerun with another plan is refused
  index.parquet, centers.parquet, stats.json   written once every shard is done
A killed run resumes: a shard whose tar and parts agree is kept, any other is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bundle.plan import SPLITS, BundlePlan, Planned, build_plan
from pipeline.bundle.render import RenderError, face_npy, render_sample, visible_mask
from pipeline.bundle.tarpack import write_shard_atomic
from pipeline.config import BuildConfig, BundleConfig
from pipeline.progress import progress
from pipeline.shards import (
    DatasetDir,
    OutputClaimError,
    atomic_write_json,
    atomic_write_parquet,
    claim_output,
    file_sha256,
)
from pipeline.stage import StageError, config_hash
from schemas.bundle import BUNDLE_CENTERS, BUNDLE_INDEX

log = logging.getLogger(__name__)

PERSON_COLS = ["person_id", "sample_id", "detection_index", "name", "url", "image_sha256", "box", "box_score",
               "keypoints_crop", "crop"]
FACE_COLS = ["person_id", "face_box", "face_landmarks", "face_score", "feature", "feature_dim"]


def pipeline_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("webbody")
    except PackageNotFoundError:
        return "0+unknown"


def build_config_hash(cfg: BuildConfig) -> str:
    # `run` says where the work runs, not what it makes: it must not change the records' bytes.
    return config_hash(cfg.model_dump(mode="json", exclude={"run"}))


def _rows(d: DatasetDir, sid: str, cols: list[str], pids: list[str]) -> dict[str, dict]:
    if not d.parquet(sid).exists():
        return {}
    t = pq.read_table(d.parquet(sid), columns=cols, filters=[("person_id", "in", pids)])
    return {r["person_id"]: r for r in t.to_pylist()}


def pack_shard(out_dir: str, shard: str, planned: list[Planned], persons_dir: str, faces_dir: str,
               bcfg: BundleConfig, version: str, cfg_hash: str) -> dict:
    """Render and write one shard; returns its stats. Pure function of its arguments (runs as a Ray task)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    pdir, fdir = DatasetDir(persons_dir), DatasetDir(faces_dir)
    drops: Counter = Counter()
    outside = 0
    rendered: list[tuple[Planned, list[tuple[str, bytes]], dict]] = []
    by_input: dict[str, list[Planned]] = {}
    for p in planned:
        by_input.setdefault(p.in_shard, []).append(p)
    for sid in sorted(by_input):
        group = by_input[sid]
        pids = [p.person_id for p in group]
        persons = _rows(pdir, sid, PERSON_COLS, pids)
        faces = _rows(fdir, sid, FACE_COLS, pids)
        for p in group:  # keep the planned order
            person = persons.get(p.person_id)
            if person is None:
                drops["missing_person"] += 1
                continue
            face = faces.get(p.person_id)
            try:
                jpg, meta, n_out = render_sample(person, face, p.__dict__, bcfg.image_size, bcfg.jpeg_quality,
                                                 version, cfg_hash)
                members = [("jpg", jpg), ("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())]
                if bcfg.write_face_npy and face is not None:
                    members.append(("face.npy", face_npy(face["feature"], int(face["feature_dim"]))))
            except RenderError as exc:
                drops[exc.reason] += 1
                log.warning("bundle %s: %s dropped (%s): %s", shard, p.person_id, exc.reason, exc)
                continue
            outside += n_out
            # Hash each member here, with the rendering, so the shard writer below only writes bytes.
            members = [(ext, data, hashlib.sha256(data).hexdigest()) for ext, data in members]
            rendered.append((p, members, meta))
    order = {p.person_id: i for i, p in enumerate(planned)}
    rendered.sort(key=lambda r: order[r[0].person_id])

    def fill(writer) -> list[dict]:
        rows = []
        for pos, (p, members, meta) in enumerate(rendered):
            m = {mem_in[0]: mem for mem_in, mem in zip(members, writer.add(p.key, members))}
            npy = m.get("face.npy")
            rows.append({
                "key": p.key, "split": p.split, "shard": shard, "position": pos,
                "offset": m["jpg"].offset, "end": writer.offset,
                "jpg_offset": m["jpg"].data_offset, "jpg_size": m["jpg"].size,
                "json_offset": m["json"].data_offset, "json_size": m["json"].size,
                "npy_offset": npy.data_offset if npy else None, "npy_size": npy.size if npy else None,
                "sha256": m["jpg"].sha256, "json_sha256": m["json"].sha256, "npy_sha256": npy.sha256 if npy else None,
                "label": p.label, "identity": p.identity, "name": meta["name"], "role": p.role,
                "subsets": p.subsets, "person_id": p.person_id, "sample_id": meta["sample_id"],
                "url": meta["url"], "image_sha256": meta["image_sha256"],
                "kp_visible": visible_mask(meta["keypoints"]), "has_face": meta["face_box"] is not None,
            })
        return rows

    tar_path = out / shard
    rows = write_shard_atomic(tar_path, fill)
    table = BUNDLE_INDEX.from_rows(rows) if rows else BUNDLE_INDEX.empty()
    stats = {"shard": shard, "split": planned[0].split if planned else "", "planned": len(planned),
             "samples": len(rows), "drops": dict(sorted(drops.items())), "keypoints_outside_frame": outside,
             "bytes": tar_path.stat().st_size, "sha256": file_sha256(tar_path),
             "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_parquet(out / "_parts" / f"{shard}.parquet", table)
    atomic_write_json(out / "_parts" / f"{shard}.json", stats)  # written last: the shard's marker
    return stats


def shard_done(out: Path, shard: str) -> bool:
    st, part, tar = out / "_parts" / f"{shard}.json", out / "_parts" / f"{shard}.parquet", out / shard
    if not (st.exists() and part.exists() and tar.exists()):
        return False
    try:
        info = json.loads(st.read_text())
    except ValueError:
        return False
    return info.get("bytes") == tar.stat().st_size


def _prepare(out: Path, meta: dict, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for tmp in list(out.glob(".*.tmp")) + list((out / "_parts").glob(".*.tmp")):
        tmp.unlink(missing_ok=True)
    try:
        changed = claim_output(out, meta, overwrite)
    except OutputClaimError as exc:
        raise StageError(f"{exc} (another selection or config)") from None
    if changed:
        for p in list(out.glob("webbody-*.tar")) + list((out / "_parts").glob("*")):
            p.unlink()
        for name in ("index.parquet", "centers.parquet", "stats.json", "report.html"):
            (out / name).unlink(missing_ok=True)


def sibling_funnel(output: Path) -> list[dict]:
    """Rows in/out and drops of every earlier stage found beside the bundle (`<build>/<stage>/stats.json`)."""
    from pipeline.registry import STAGE_NAMES

    rows = []
    for name in STAGE_NAMES:
        p = output.parent / name / "stats.json"
        if name == "bundle" or not p.exists():
            continue
        st = json.loads(p.read_text())
        rows.append({"stage": name, "rows_in": st.get("rows_in"), "rows_out": st.get("rows_out"),
                     "drops": st.get("drops", {}), **({"identities": st["identities"]} if "identities" in st else {})})
    return rows


def write_centers(out: Path, plan: BundlePlan) -> None:
    rows = [{"identity": i, "center": c.astype("<f4").tobytes(), "dim": int(c.size), "count": n, "embedder": e}
            for i, (c, n, e) in sorted(plan.centers.items())]
    table = BUNDLE_CENTERS.from_rows(rows) if rows else BUNDLE_CENTERS.empty()
    atomic_write_parquet(out / "centers.parquet", table)


def summarize(out: Path, shard_stats: list[dict], extra: dict) -> dict:
    """index.parquet from the parts, and stats.json. Also used by `remove` after rewriting shards."""
    parts = [pq.read_table(out / "_parts" / f"{s['shard']}.parquet") for s in shard_stats]
    index = pa.concat_tables([BUNDLE_INDEX.validate(p) for p in parts]) if parts else BUNDLE_INDEX.empty()
    atomic_write_parquet(out / "index.parquet", index)
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
            "labels": (pc.max(sub.column("label")).as_py() + 1) if sub.num_rows else 0,
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
    atomic_write_json(out / "stats.json", stats)
    return stats


def run_bundle(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    for need in ("clean", "persons", "faces"):
        if need not in inputs:
            raise StageError(f"bundle needs the '{need}' output (inputs: {sorted(inputs)})")
    t0 = time.perf_counter()
    bcfg = cfg.bundle
    plan = build_plan(bcfg, inputs["clean"], inputs["persons"], inputs["faces"])
    version, chash = pipeline_version(), build_config_hash(cfg)
    meta = {"stage": "bundle", "config_hash": chash, "plan": plan.digest(), "version": version}
    output = Path(output)
    _prepare(output, meta, overwrite)
    shards = plan.by_shard()
    # Opt-outs applied by `webbody remove` stay applied: their samples are never written again. Filtering after
    # the shard assignment keeps every other sample in the shard and position it already has.
    from pipeline.bundle.remove import key_hash, removed_hashes

    removed = removed_hashes(output)
    if removed["keys"]:
        shards = {s: [p for p in ps if key_hash(p.key) not in removed["keys"]] for s, ps in shards.items()}
        shards = {s: ps for s, ps in shards.items() if ps}
        for ident in [i for i in plan.centers if key_hash(i) in removed["identities"]]:
            del plan.centers[ident]
    todo = [s for s in shards if not shard_done(output, s)]
    args = (str(inputs["persons"]), str(inputs["faces"]), bcfg, version, chash)
    if todo and cfg.run.executor == "ray" and len(todo) > 1:
        import ray

        from pipeline.runtime import init_ray

        init_ray(cfg.run.ray_address)
        remote = ray.remote(num_cpus=1)(pack_shard)
        refs = [remote.remote(str(output), s, shards[s], *args) for s in todo]
        bar = progress(total=len(refs), desc="bundle", unit="shard")
        pending = refs
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            bar.update(1)
        bar.close()
    else:
        for s in progress(todo, desc="bundle", unit="shard"):
            pack_shard(str(output), s, shards[s], *args)
    shard_stats = [json.loads((output / "_parts" / f"{s}.json").read_text()) for s in sorted(shards)]
    write_centers(output, plan)
    extra = {
        "rows_in": plan.rows_in,
        "plan_drops": dict(plan.drops),
        "pipeline_version": version,
        "config_hash": chash,
        "plan": meta["plan"],
        "image_size": bcfg.image_size,
        "split_plan": plan.splits.stats,
        "funnel": sibling_funnel(output),
        "removals": {"requests": 0, "samples": 0},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return summarize(output, shard_stats, extra)


def center_matrix(out: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(identities, L2-normalised centers, embedder per identity) from centers.parquet."""
    path = out / "centers.parquet"
    if not path.exists():
        raise StageError(f"{path} not found: this bundle has no identity centers (rebuild it with this version)")
    t = pq.read_table(path).to_pylist()
    if not t:
        return [], np.zeros((0, 0), np.float32), []
    mat = np.stack([np.frombuffer(r["center"], dtype="<f4") for r in t]).astype(np.float32)
    mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
    return [r["identity"] for r in t], mat, [r["embedder"] for r in t]
