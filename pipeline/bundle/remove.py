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

import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle.layout import (
    CENTERS,
    INDEX,
    REMOVED,
    center_matrix,
    index_of,
    key_hash,
    parquet_bytes,
    removed_hashes,
    summarize,
)
from pipeline.bundle.store import Store, as_store
from pipeline.bundle.writers import OutputWriter, writer_of
from pipeline.config import BuildConfig
from pipeline.shards import ROLLUP, DatasetDir, file_sha256
from pipeline.stage import StageError
from schemas.bundle import BUNDLE_CENTERS, BUNDLE_INDEX

log = logging.getLogger(__name__)

EmbedFn = Callable[[Path], tuple[np.ndarray, str]]  # image -> (raw feature of its largest face, embedder name)


def _norm_name(s: str) -> str:
    return " ".join(s.casefold().split())


def embed_largest_face(image: Path, cfg: BuildConfig) -> tuple[np.ndarray, str]:
    """Detect and embed the largest face of a photo with the faces stage's configured models."""
    import cv2

    from pipeline.faces.photos import photo_faces
    from pipeline.faces.stage import FacesStage

    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise StageError(f"{image}: not a readable image")
    stage = FacesStage(cfg.faces)
    stage.ensure_setup()
    found = photo_faces(stage.detector, stage.embedder, [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)], pick="largest",
                        score_threshold=0.5)[0]
    if found.reason == "no_face":
        raise StageError(f"{image}: no face found; try a clearer photo, or --name / --url")
    if found.feature is None:
        raise StageError(f"{image}: the face could not be aligned ({found.error})")
    return found.feature, stage.embedder.name


def match_face(out: str | Path | Store, feature: np.ndarray, embedder: str, cfg: BuildConfig) -> set[str]:
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
    """Remove one subject from a bundle (a local folder or an object-store URI); returns counts (samples,
    identities, shards rewritten/deleted), never names."""
    if sum(x is not None for x in (name, url, face)) != 1:
        raise StageError("give exactly one of --name, --url, --face")
    d, store = DatasetDir(out), as_store(str(out))
    if not (d.has(INDEX) and d.has(ROLLUP)):
        raise StageError(f"{d.uri} is not a finished bundle (no index.parquet / stats.json)")
    cfg = cfg or BuildConfig()
    index = pq.read_table(io.BytesIO(store.read_bytes(INDEX))).to_pylist()
    if name is not None:
        want = _norm_name(name)
        drop = [r for r in index if _norm_name(r["name"]) == want]
    elif url is not None:
        drop = [r for r in index if r["url"] == url.strip()]
    else:
        feature, embedder = (embed or (lambda p: embed_largest_face(p, cfg)))(Path(face))
        idents = match_face(store, feature, embedder, cfg)
        drop = [r for r in index if r["identity"] in idents]
    drop_keys = {r["key"] for r in drop}
    removed_ids = {r["identity"] for r in drop}
    # identities left with no sample at all vanish (and so does their center)
    gone_ids = {i for i in removed_ids if all(r["key"] in drop_keys for r in index if r["identity"] == i)}
    stats = d.read_json(ROLLUP)
    if "tars" not in stats:
        raise StageError(f"{d.uri} was written before the bundle ran on the executor contract (a `_parts/` folder): "
                         "rebuild it with this version (`webbody stage bundle ... --overwrite`), then remove")
    if not stats.get("complete") or stats.get("shards") != len(d.done_ids()):
        raise StageError(f"{d.uri} has unfinished windows (a removal or a build was interrupted): run the bundle "
                         "stage again to finish it (earlier opt-outs stay applied), then remove")
    writer = writer_of(stats)
    touched = {r["shard"] for r in drop}
    windows = d.done_ids()
    # The opt-out is recorded first: a rebuild after an interrupted removal never writes the subject again.
    hashes = removed_hashes(store)
    hashes["keys"] |= {key_hash(k) for k in drop_keys}
    hashes["identities"] |= {key_hash(i) for i in gone_ids}
    requests = hashes.pop("requests") + 1
    d.write_json(REMOVED, {**{k: sorted(v) for k, v in hashes.items()}, "requests": requests})
    parts, tars, rewritten, deleted = [], {}, 0, 0
    for sid in windows:
        wstats = d.shard_stats(sid)
        part = d.read_shard(sid)
        if touched & set(wstats.get("tars", {})):
            part, n_rewritten, n_deleted = _rewrite_window(d, store, writer, sid, part, wstats, drop_keys)
            rewritten, deleted = rewritten + n_rewritten, deleted + n_deleted
        parts.append(part)
        tars.update(wstats.get("tars", {}))
    index_t = index_of(parts)
    _update_centers(store, writer, index_t, gone_ids, removed_ids - gone_ids)
    removals = stats.get("removals") or {"requests": 0, "samples": 0}
    removals = {"requests": removals["requests"] + 1, "samples": removals["samples"] + len(drop_keys)}
    keep = {k: v for k, v in stats.items() if k not in ("rows_out", "identities", "splits", "tars", "bytes",
                                                          "keypoints_outside_frame")}
    # Removed samples are not drops: the drop counts stay those of the build.
    new = {**keep, **summarize(index_t, tars, {}), "drops": stats.get("drops", {}), "removals": removals}
    d.put(INDEX, parquet_bytes(index_t))
    d.write_json(ROLLUP, new)
    if d.has("report.html"):
        from pipeline.bundle.report import write_report

        write_report(str(out))
    result = {"samples": len(drop_keys), "identities": len(gone_ids), "shards_rewritten": rewritten,
              "shards_deleted": deleted}
    log.info("remove: %s", result)
    return result


def _rewrite_window(d: DatasetDir, store: Store, writer: OutputWriter, sid: str, part, wstats: dict,
                    drop_keys: set[str]):
    """Re-commit window `sid` without `drop_keys`: its touched shards rewritten (emptied ones deleted), its
    index part, stats and marker after them, the contract's order (marker removed first, written last)."""
    rows = part.to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    marker = d.read_marker(sid)
    keep_files = dict(marker.get("files", {}))
    tars = wstats["tars"]
    new_rows: list[dict] = []
    files: dict[str, Path] = {}
    gone: list[str] = []
    with tempfile.TemporaryDirectory(prefix="webbody-remove-") as tmp:
        for shard in sorted(tars):
            shard_rows = sorted(by_shard.get(shard, []), key=lambda r: r["position"])
            if not any(r["key"] in drop_keys for r in shard_rows):
                new_rows += shard_rows
                continue
            kept = [r for r in shard_rows if r["key"] not in drop_keys]
            keep_files.pop(shard, None)
            if not kept:
                gone.append(shard)
                del tars[shard]
                continue
            src = Path(store.join(shard)) if store.local else Path(tmp) / f"in-{shard}"
            if not store.local:
                store.fs.get_file(store.join(shard), str(src))
            dst = Path(tmp) / shard
            new_rows += writer.rewrite(src, dst, kept)
            files[shard] = dst
            tars[shard].update(samples=len(kept), bytes=dst.stat().st_size, sha256=file_sha256(dst))
        table = BUNDLE_INDEX.from_rows(new_rows) if new_rows else BUNDLE_INDEX.empty()
        table = table.sort_by([("shard", "ascending"), ("position", "ascending")])
        wstats.update(rows_out=table.num_rows, tars=tars)
        d.delete([f"part-{sid}.done"])
        d.delete(gone)
        d.commit_shard(sid, table, wstats, files=files, had_marker=False, keep_files=keep_files)
    return table, len(files), len(gone)


def _update_centers(store: Store, writer: OutputWriter, index, gone: set[str], shrunk: set[str]) -> None:
    """Drop the centers of vanished identities; recompute shrunk ones from their remaining `.face.npy`."""
    if not store.exists(CENTERS):
        return
    rows = [r for r in pq.read_table(io.BytesIO(store.read_bytes(CENTERS))).to_pylist() if r["identity"] not in gone]
    if shrunk:
        samples_of: dict[str, list[dict]] = {}
        for r in index.to_pylist():
            if r["identity"] in shrunk and r["npy_offset"] is not None:
                samples_of.setdefault(r["identity"], []).append(r)
        for row in rows:
            if row["identity"] not in shrunk:
                continue
            samples = samples_of.get(row["identity"], [])
            if not samples:
                log.warning("remove: an identity lost samples and has no .face.npy to recompute its center")
                continue
            total = np.zeros(row["dim"], np.float32)
            for r in samples:
                total += np.load(io.BytesIO(writer.read_member(store, r, "face.npy"))).astype(np.float32)
            row.update(center=total.astype("<f4").tobytes(), count=len(samples))
    store.write_parquet(CENTERS, BUNDLE_CENTERS.from_rows(rows) if rows else BUNDLE_CENTERS.empty())
