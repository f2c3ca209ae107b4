"""Cross-identity similarity search with faiss, in query blocks, so memory never holds an N x N matrix.

The index holds the (normalised, float32) vectors once; queries go block by block and only the pairs
above a threshold come back. Both helpers return results in a canonical order, so nothing depends on
faiss's thread scheduling.
"""

from __future__ import annotations

import faiss
import numpy as np


def _flat_index(base: np.ndarray) -> faiss.IndexFlatIP:
    base = np.ascontiguousarray(base, dtype=np.float32)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index


def pairs_above(x: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of rows of `x` (L2-normalised) with cosine > threshold: (i, j, cos), sorted by (i, j)."""
    n = len(x)
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = _flat_index(x)
    out_i, out_j, out_s = [], [], []
    for start in range(0, n, block):
        q = x[start:start + block]
        lims, sims, nbrs = index.range_search(q, float(threshold))
        rows = np.repeat(np.arange(start, start + len(q)), np.diff(lims).astype(np.int64))
        keep = nbrs > rows  # each unordered pair once, no self pairs
        out_i.append(rows[keep])
        out_j.append(nbrs[keep].astype(np.int64))
        out_s.append(sims[keep])
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def best_match(queries: np.ndarray, base: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the highest cosine to any row of `base` and its index (-1 and -inf when empty)."""
    nq = len(queries)
    best = np.full(nq, -np.inf, dtype=np.float32)
    arg = np.full(nq, -1, dtype=np.int64)
    if nq == 0 or len(base) == 0:
        return best, arg
    index = _flat_index(base)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for start in range(0, nq, block):
        sims, nbrs = index.search(queries[start:start + block], 1)
        best[start:start + len(sims)] = sims[:, 0]
        arg[start:start + len(sims)] = nbrs[:, 0]
    return best, arg
