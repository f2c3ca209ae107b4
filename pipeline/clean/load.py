"""Read every finished faces shard into the clean state: features (float16, normalised) and row metadata.

Only the columns clean needs stay in memory: the features (N x D float16) dominate, about 1 KiB a row at
512-d. Rows whose feature cannot be used (wrong length, another dimension, non-finite, zero) are dropped
as `bad_feature` and logged, never silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.clean.copies import load_patch_hashes
from pipeline.clean.state import DROPPED, CleanState, normalise
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from schemas.faces import FACES

log = logging.getLogger(__name__)

META_COLUMNS = ["person_id", "sample_id", "detection_index", "source_label", "name"]


@dataclass
class Loaded:
    state: CleanState
    meta: pa.Table  # META_COLUMNS in input order (shard after shard)
    shard_ids: list[str]
    offsets: np.ndarray  # rows of shard k are [offsets[k], offsets[k + 1])
    embedder: str | None  # None when the input holds no rows
    dim: int


def _dense_features(col: pa.Array, dim: int) -> np.ndarray:
    """(n, dim) float16 from a binary column whose values are all exactly 2 * dim bytes."""
    col = col.cast(pa.large_binary()) if not isinstance(col, pa.LargeBinaryArray) else col
    if len(col) == 0:
        return np.zeros((0, dim), dtype=np.float16)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    return data.view("<f2").reshape(len(col), dim)


def _majority_dim(inp: DatasetDir, ids: list[str]) -> int:
    dims: Counter = Counter()
    for sid in ids:
        dims.update(inp.read_shard(sid, columns=["feature_dim"]).column("feature_dim").to_pylist())
    return dims.most_common(1)[0][0] if dims else 0


def _rank(values: pa.ChunkedArray) -> np.ndarray:
    """Rank of each value in sorted order (equal values get distinct ranks in input order)."""
    order = np.asarray(pc.sort_indices(values))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _codes(values: pa.ChunkedArray, sort: bool) -> tuple[np.ndarray, list[str]]:
    enc = pc.dictionary_encode(values).combine_chunks()
    codes = np.asarray(enc.indices, dtype=np.int64)
    dictionary = enc.dictionary
    if not sort:
        return codes, dictionary.to_pylist()
    order = np.asarray(pc.sort_indices(dictionary))
    new_code = np.empty(len(order), dtype=np.int64)
    new_code[order] = np.arange(len(order))
    return new_code[codes], [dictionary[int(k)].as_py() for k in order]


def load_faces(inp: DatasetDir, persons: DatasetDir | None = None, ids: list[str] | None = None) -> Loaded:
    """All finished faces shards (or the shards `ids`, in that order); with `persons`, also the perceptual
    hashes of every row's face patch."""
    ids = inp.done_ids() if ids is None else list(ids)
    dim = _majority_dim(inp, ids)
    # Preallocated: concatenating per-shard arrays would hold the features twice at the peak.
    total = sum(inp.num_rows(sid) for sid in ids)
    feats = np.zeros((total, dim), dtype=np.float16)
    metas, norms, scores, bad, embedders = [], [], [], [], Counter()
    hashes, flips, unhashed = [], [], 0
    crop_lists: list[list] = []
    offsets = [0]
    for sid in ids:
        table = FACES.validate(inp.read_shard(sid), where=str(inp.parquet(sid)))
        n = table.num_rows
        embedders.update(table.column("embedder").to_pylist())
        lengths = np.asarray(pc.binary_length(table.column("feature")).fill_null(0))
        ok = (lengths == 2 * dim) & (np.asarray(table.column("feature_dim")) == dim)
        f = np.zeros((n, dim), dtype=np.float16)
        if ok.any():
            good = table.column("feature").combine_chunks().filter(pa.array(ok))
            f[ok] = _dense_features(good, dim)
        f32 = f.astype(np.float32)
        computed = np.linalg.norm(f32, axis=1)
        ok &= np.isfinite(f32).all(axis=1) & (computed > 0)
        norm = np.asarray(table.column("feature_norm"), dtype=np.float32)
        norm = np.where(np.isfinite(norm) & (norm > 0), norm, computed).astype(np.float32)
        if (~ok).any():
            log.warning("clean: %d rows of faces shard %s have unusable features (bad_feature)", (~ok).sum(), sid)
        feats[offsets[-1]:offsets[-1] + n] = normalise(f32)
        norms.append(norm)
        scores.append(np.asarray(table.column("face_score"), dtype=np.float32))
        bad.append(~ok)
        metas.append(table.select(META_COLUMNS).replace_schema_metadata(None))
        if persons is not None:
            h, hf, missing, crops = load_patch_hashes(persons, [sid], [table.column("person_id").to_pylist()],
                                                      [table.column("face_box").to_pylist()])
            crop_lists.append(crops)
            hashes.append(h)
            flips.append(hf)
            unhashed += missing
        offsets.append(offsets[-1] + n)
    if len(embedders) > 1:
        raise StageError(
            f"faces output {inp.root} mixes embedders {dict(embedders)}: clean compares features, so every "
            "row must come from one embedder; re-run the faces stage with one `faces.embedder`"
        )
    meta = pa.concat_tables(metas) if metas else FACES.empty().select(META_COLUMNS).replace_schema_metadata(None)
    label, labels = _codes(meta.column("source_label"), sort=True)
    photo, _ = _codes(meta.column("sample_id"), sort=False)
    state = CleanState(
        feats=feats,
        norms=np.concatenate(norms) if norms else np.zeros(0, dtype=np.float32),
        label=label,
        labels=labels,
        photo=photo,
        face_score=np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32),
        order_key=_rank(meta.column("person_id")),
    )
    if persons is not None:
        state.hash = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        state.hash_flip = np.concatenate(flips) if flips else np.zeros(0, dtype=np.uint64)
        state.crops = np.asarray([c for part in crop_lists for c in part] + [None], dtype=object)[:-1]
    bad_rows = np.concatenate(bad) if bad else np.zeros(0, dtype=bool)
    state.ident[bad_rows] = DROPPED
    state.reason[bad_rows] = "bad_feature"
    embedder = next(iter(embedders)) if embedders else None
    return Loaded(state, meta, ids, np.asarray(offsets, dtype=np.int64), embedder, dim)
