"""`webbody remove DIR (--name N | --url U | --face IMAGE)`: honour an opt-out request on a finished bundle.

- `--name`: every sample of every identity whose name matches (case- and space-insensitive).
- `--url`: every sample cut from that source URL (all people in that photo).
- `--face`: the largest face of IMAGE is detected and embedded with the build's faces models; every identity
  whose center (centers.parquet) has cosine >= the clean stage's merge threshold for that embedder is removed.

Only the shards holding the subject are rewritten (other members copied byte for byte, so their checksums stay);
index.parquet, centers.parquet, stats.json and an existing report.html are updated; emptied shards are
deleted. `_removed.json` keeps only sha256 hashes of removed keys and identities, so a rerun of the bundle
stage over the same selection never writes them again, and nothing readable about the subject remains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle.layout import center_matrix, key_hash, removed_hashes, summarize
from pipeline.bundle.tarpack import iter_members, split_member_name, write_shard_atomic
from pipeline.config import BuildConfig
from pipeline.shards import atomic_write_json, atomic_write_parquet, file_sha256
from pipeline.stage import StageError
from schemas.bundle import BUNDLE_CENTERS, BUNDLE_INDEX

log = logging.getLogger(__name__)

EmbedFn = Callable[[Path], tuple[np.ndarray, str]]  # image -> (raw feature of its largest face, embedder name)


def _norm_name(s: str) -> str:
    return " ".join(s.casefold().split())


def embed_largest_face(image: Path, cfg: BuildConfig) -> tuple[np.ndarray, str]:
    """Detect and embed the largest face of a photo with the faces stage's configured models."""
    import cv2

    from pipeline.faces.align import (
        AlignError,
        pad_to_square,
        similarity_to_template,
        transform_points,
        warp_face,
    )
    from pipeline.faces.embedders import FaceCrop
    from pipeline.faces.stage import FacesStage

    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise StageError(f"{image}: not a readable image")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    stage = FacesStage(cfg.faces)
    stage.ensure_setup()
    square, left, top = pad_to_square(rgb, value=0)
    dets = stage.detector.detect_batch([square], max_faces=None, score_threshold=0.5)[0]
    if not dets:
        raise StageError(f"{image}: no face found; try a clearer photo, or --name / --url")
    det = max(dets, key=lambda d: float(np.prod(d.box[2:] - d.box[:2])))
    try:
        matrix = similarity_to_template(det.landmarks)
    except AlignError as exc:
        raise StageError(f"{image}: the face could not be aligned ({exc})") from exc
    offset = np.array([-left, -top], np.float32)
    crop = FaceCrop(warp_face(square, matrix), transform_points(det.landmarks, matrix), rgb,
                    (det.box.reshape(2, 2) + offset).reshape(4))
    return np.asarray(stage.embedder.embed([crop])[0], np.float32), stage.embedder.name


def match_face(out: Path, feature: np.ndarray, embedder: str, cfg: BuildConfig) -> set[str]:
    from pipeline.clean.select import resolve_thresholds

    ids, centers, embedders = center_matrix(out)
    if not ids:
        return set()
    if any(e != embedder for e in embedders):
        raise StageError(f"the bundle's centers come from the '{embedders[0]}' embedder, the photo was embedded with "
                         f"'{embedder}': set faces.embedder (and its weights) as in the build's config")
    threshold = resolve_thresholds(cfg.clean, embedder).merge
    q = feature / max(float(np.linalg.norm(feature)), 1e-12)
    sims = centers @ q
    return {i for i, s in zip(ids, sims) if s >= threshold}


def remove_subject(out: str | Path, *, name: str | None = None, url: str | None = None, face: str | Path | None = None,
                   cfg: BuildConfig | None = None, embed: EmbedFn | None = None) -> dict:
    """Remove one subject; returns counts (samples, identities, shards rewritten/deleted), never names."""
    from pipeline import storage

    if not storage.is_local(str(out)):
        raise StageError(f"{storage.display(str(out))}: `webbody remove` rewrites shards in place and works on local "
                         "bundle folders only; sync the bundle to a local folder, remove, and sync it back")
    out = Path(out)
    if sum(x is not None for x in (name, url, face)) != 1:
        raise StageError("give exactly one of --name, --url, --face")
    if not (out / "index.parquet").exists() or not (out / "stats.json").exists():
        raise StageError(f"{out} is not a finished bundle (no index.parquet / stats.json)")
    cfg = cfg or BuildConfig()
    index = pq.read_table(out / "index.parquet").to_pylist()
    if name is not None:
        want = _norm_name(name)
        drop = [r for r in index if _norm_name(r["name"]) == want]
    elif url is not None:
        drop = [r for r in index if r["url"] == url.strip()]
    else:
        feature, embedder = (embed or (lambda p: embed_largest_face(p, cfg)))(Path(face))
        idents = match_face(out, feature, embedder, cfg)
        drop = [r for r in index if r["identity"] in idents]
    drop_keys = {r["key"] for r in drop}
    removed_ids = {r["identity"] for r in drop}
    # identities left with no sample at all vanish (and so does their center)
    gone_ids = {i for i in removed_ids if all(r["key"] in drop_keys for r in index if r["identity"] == i)}
    stats = json.loads((out / "stats.json").read_text())
    shards = sorted({r["shard"] for r in drop})
    deleted = []
    for shard in shards:
        if not _rewrite_shard(out, shard, drop_keys, stats):
            deleted.append(shard)
    shard_stats = [json.loads((out / "_parts" / f"{s}.json").read_text()) for s in sorted(stats["shards"])
                   if s not in deleted]
    _update_centers(out, gone_ids, removed_ids - gone_ids, stats)
    hashes = removed_hashes(out)
    hashes["keys"] |= {key_hash(k) for k in drop_keys}
    hashes["identities"] |= {key_hash(i) for i in gone_ids}
    atomic_write_json(out / "_removed.json", {k: sorted(v) for k, v in hashes.items()})
    removals = stats.get("removals") or {"requests": 0, "samples": 0}
    removals = {"requests": removals["requests"] + 1, "samples": removals["samples"] + len(drop_keys)}
    keep = {k: v for k, v in stats.items() if k not in ("rows_out", "drops", "identities", "splits", "shards", "bytes",
                                                          "keypoints_outside_frame", "complete", "stage")}
    keep["removals"] = removals
    summarize(out, shard_stats, {**keep, "plan_drops": {}})
    if (out / "report.html").exists():
        from pipeline.bundle.report import write_report

        write_report(out)
    result = {"samples": len(drop_keys), "identities": len(gone_ids), "shards_rewritten": len(shards) - len(deleted),
              "shards_deleted": len(deleted)}
    log.info("remove: %s", result)
    return result


def _rewrite_shard(out: Path, shard: str, drop_keys: set[str], stats: dict) -> bool:
    """Rewrite one shard without `drop_keys`; returns False (and deletes it) when nothing is left."""
    path = out / shard
    part = pq.read_table(out / "_parts" / f"{shard}.parquet").to_pylist()
    kept_rows = [r for r in part if r["key"] not in drop_keys]
    old = json.loads((out / "_parts" / f"{shard}.json").read_text())
    if not kept_rows:
        for p in (path, out / "_parts" / f"{shard}.parquet", out / "_parts" / f"{shard}.json"):
            p.unlink(missing_ok=True)
        stats["shards"].pop(shard, None)
        return False
    members: dict[str, list[tuple[str, bytes]]] = {}
    for ti, data in iter_members(path):
        key, ext = split_member_name(ti.name)
        if key not in drop_keys:
            members.setdefault(key, []).append((ext, data))
    by_key = {r["key"]: r for r in kept_rows}

    def fill(writer) -> list[dict]:
        rows = []
        for pos, r in enumerate(sorted(kept_rows, key=lambda r: r["position"])):
            got = {ext: m for (ext, _), m in zip(members[r["key"]], writer.add(r["key"], members[r["key"]]))}
            row = dict(by_key[r["key"]])
            row.update(position=pos, offset=got["jpg"].offset, end=writer.offset,
                       jpg_offset=got["jpg"].data_offset, json_offset=got["json"].data_offset)
            if "face.npy" in got:
                row["npy_offset"] = got["face.npy"].data_offset
            rows.append(row)
        return rows

    rows = write_shard_atomic(path, fill)
    atomic_write_parquet(out / "_parts" / f"{shard}.parquet", BUNDLE_INDEX.from_rows(rows))
    old.update(samples=len(rows), bytes=path.stat().st_size, sha256=file_sha256(path))
    atomic_write_json(out / "_parts" / f"{shard}.json", old)
    return True


def _update_centers(out: Path, gone: set[str], shrunk: set[str], stats: dict) -> None:
    """Drop the centers of vanished identities; recompute shrunk ones from their remaining `.face.npy`."""
    path = out / "centers.parquet"
    if not path.exists():
        return
    rows = [r for r in pq.read_table(path).to_pylist() if r["identity"] not in gone]
    if shrunk:
        import io

        # the shards' parts hold the new offsets (index.parquet is rewritten after this)
        index = [r for s in stats["shards"] for r in pq.read_table(out / "_parts" / f"{s}.parquet").to_pylist()]
        for row in rows:
            if row["identity"] not in shrunk:
                continue
            samples = [r for r in index if r["identity"] == row["identity"] and r["npy_offset"] is not None]
            if not samples:
                log.warning("remove: an identity lost samples and has no .face.npy to recompute its center")
                continue
            total = np.zeros(row["dim"], np.float32)
            for r in samples:
                with open(out / r["shard"], "rb") as fh:
                    fh.seek(r["npy_offset"])
                    total += np.load(io.BytesIO(fh.read(r["npy_size"]))).astype(np.float32)
            row.update(center=total.astype("<f4").tobytes(), count=len(samples))
    atomic_write_parquet(path, BUNDLE_CENTERS.from_rows(rows) if rows else BUNDLE_CENTERS.empty())
