"""Cross-identity similarity search as blocked matrix products: memory is one tile, whatever N is.

A tile is at most `block` query rows x TILE_ELEMS / rows base rows of float32 similarities (128 MiB), made
by one BLAS sgemm into a buffer reused for every tile of a call. Inputs may be stored as float16 (or any
float type): rows are converted to float32 one chunk at a time, so a float16 block never exists twice in
float32. Rows must already be L2-normalised (callers normalise each block once). Only the pairs above a
threshold leave a tile: a vectorised row maximum finds the rows holding any (at the merge threshold almost
none), and only those rows are scanned for pairs, so no per-pair Python and no (tile)-sized mask per tile.
This is the exact search an IndexFlatIP does; `benchmarks/clean_search.py` measures it against the
kernel it replaced and against faiss-cpu's IndexFlatIP.range_search (results/clean_search.json). Results
come back in a canonical order, independent of tiling.
"""

from __future__ import annotations

import numpy as np

TILE_ELEMS = 1 << 25  # float32 similarities per tile: 128 MiB
MAX_QUERY_ROWS = 2048

_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def _tiles(block: int) -> tuple[int, int]:
    """(query rows, base rows) of a tile: `block` bounds both (small blocks exercise the tiling in tests)."""
    q = max(1, min(block, MAX_QUERY_ROWS))
    return q, max(1, min(block, TILE_ELEMS // q))


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _tile_pairs(q: np.ndarray, b: np.ndarray, threshold: float, buf: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row in q, row in b, cos) of the tile's pairs above `threshold`; `buf` holds the similarities."""
    sims = np.matmul(q, b.T, out=buf[: len(q) * len(b)].reshape(len(q), len(b)))
    rows = np.flatnonzero(sims.max(axis=1) > threshold)
    if not len(rows):
        return _EMPTY
    sub = sims[rows]
    r, c = np.nonzero(sub > threshold)
    return rows[r], c.astype(np.int64), sub[r, c]


def _search(xq: np.ndarray, xb: np.ndarray, threshold: float, block: int, upper: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j) with cos > threshold, sorted by (i, j); `upper`: xq is xb and only j > i counts."""
    q_rows, b_rows = _tiles(block)
    buf = np.empty(min(len(xq), q_rows) * min(len(xb), b_rows) or 1, dtype=np.float32)
    out = [_EMPTY]
    for qs in range(0, len(xq), q_rows):
        q = _f32(xq[qs:qs + q_rows])
        # With `upper`, only base rows from qs on: the other half of the matrix holds the same pairs.
        for bs in range(qs if upper else 0, len(xb), b_rows):
            b = q if upper and bs == qs and b_rows == q_rows else _f32(xb[bs:bs + b_rows])
            i, j, s = _tile_pairs(q, b, threshold, buf)
            i, j = i + qs, j + bs
            if upper:
                keep = j > i
                i, j, s = i[keep], j[keep], s[keep]
            out.append((i, j, s))
    i, j, s = (np.concatenate(parts) for parts in zip(*out))
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def pairs_above(x: np.ndarray, threshold: float, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of rows of `x` (L2-normalised) with cosine > threshold: (i, j, cos), sorted by (i, j)."""
    return _search(x, x, threshold, block, upper=True)


def pairs_between(xq: np.ndarray, xb: np.ndarray, threshold: float, block: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (query row i, base row j) of two L2-normalised sets with cosine > threshold: (i, j, cos),
    sorted by (i, j). The rectangular tile of the distributed search (pipeline/clean/cross.py)."""
    return _search(xq, xb, threshold, block, upper=False)


def best_match(queries: np.ndarray, base: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the highest cosine to any row of `base` and its index (-inf and -1 when empty)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    arg = np.full(len(queries), -1, dtype=np.int64)
    q_rows, b_rows = _tiles(block)
    for qs in range(0, len(queries), q_rows):
        xq = queries[qs:qs + q_rows]
        for bs in range(0, len(base), b_rows):
            sims = xq @ base[bs:bs + b_rows].T
            k = sims.argmax(axis=1)
            top = sims[np.arange(len(xq)), k]
            better = top > best[qs:qs + len(xq)]  # strict: the first best index wins ties
            best[qs:qs + len(xq)][better] = top[better]
            arg[qs:qs + len(xq)][better] = k[better] + bs
    return best, arg
