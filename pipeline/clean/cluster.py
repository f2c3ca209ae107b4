"""Step 1: per-name face clustering (the "dominant person" rule) and one detection per photo.

Within each name, DBSCAN (scikit-learn, precomputed distance 1 - clip(cos, 0, 1)) groups the faces; the
`top_k` largest clusters become identities and everything else is dropped. DBSCAN runs on a sparse
neighbour graph covering many names at once: names share no edges, so one call over the block-diagonal
graph gives exactly the per-name clusterings, without one scikit-learn call (and its overhead) per name.
Pairs are computed name by name in row blocks, so a single huge name is bounded by `pair_budget` too.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN

from pipeline.clean.state import CleanState, normalise

# Distances of exact duplicates are 0; scipy keeps explicit zeros, but a floor keeps that independent of
# any later sparse operation that prunes them. It is far below any meaningful eps.
_MIN_DIST = np.float32(1e-12)


def _name_edges(f: np.ndarray, eps: float, offset: int, row_block: int) -> tuple[np.ndarray, ...]:
    """Neighbour pairs (distance <= eps) of one name's rows, as global (row, col, distance)."""
    rows, cols, dists = [], [], []
    n = len(f)
    for start in range(0, n, row_block):
        sims = f[start:start + row_block] @ f.T
        d = 1.0 - np.clip(sims, 0.0, 1.0)
        r, c = np.nonzero(d <= eps)
        rows.append(r + start + offset)
        cols.append(c + offset)
        dists.append(np.maximum(d[r, c], _MIN_DIST))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


def _dbscan_block(feats: np.ndarray, bounds: list[tuple[int, int]], eps: float, min_samples: int,
                  pair_budget: int) -> np.ndarray:
    """DBSCAN labels for consecutive names (`bounds` are [start, end) of each name in `feats`)."""
    parts = []
    for a, b in bounds:
        row_block = max(1, pair_budget // max(1, b - a))
        parts.append(_name_edges(feats[a:b], eps, a, row_block))
    r, c, d = (np.concatenate(p) for p in zip(*parts))
    n = len(feats)
    graph = sp.csr_matrix((d, (r, c)), shape=(n, n))
    return DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)


def _rank_clusters(labels: np.ndarray, photos: np.ndarray, top_k: int, tie_share: float
                   ) -> tuple[dict[int, int], bool]:
    """(cluster id -> rank for the `top_k` largest clusters of one name, whether the name is ambiguous).

    Size is the number of distinct photos (a group photo of look-alikes must not outweigh separate
    photos), then the number of faces, then the earliest row (rows are in person_id order): deterministic.
    With `top_k == 1` the name is ambiguous when the runner-up holds at least `tie_share` of the winner's
    distinct photos (1.0: only an exact tie): row order must never pick the person.
    """
    ranked = []
    for cid in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == cid)
        ranked.append((-len(np.unique(photos[members])), -len(members), int(members[0]), int(cid)))
    ranked.sort()
    ambiguous = top_k == 1 and len(ranked) > 1 and -ranked[1][0] >= tie_share * -ranked[0][0]
    return {cid: rank for rank, (_, _, _, cid) in enumerate(ranked[:top_k])}, ambiguous


def identity_name(label: str, rank: int) -> str:
    """Stable identity id of the rank-th cluster of a name: the name's label, suffixed beyond the first."""
    return label if rank == 0 else f"{label}.c{rank}"


def cluster_names(state: CleanState, eps: float, min_samples: int, top_k: int, pair_budget: int,
                  tie_share: float = 1.0) -> dict:
    """Assign identities: per name, the top_k DBSCAN clusters; the rest is `dbscan_noise` or
    `not_largest_cluster`; a name whose top two clusters tie (see `_rank_clusters`) yields no identity
    (`ambiguous_name`). Then `same_photo`: one detection per photo per identity."""
    usable = state.kept()
    rows = np.flatnonzero(usable)
    rows = rows[np.lexsort((state.order_key[rows], state.label[rows]))]
    lab = state.label[rows]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(rows) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(rows)].astype(np.int64)

    cluster = np.full(len(rows), -1, dtype=np.int64)
    block_start, pairs = 0, 0
    for k in range(len(starts) + 1):
        size = int(ends[k] - starts[k]) if k < len(starts) else 0
        # Close the current block when it would exceed the pair budget, or at the end.
        if k == len(starts) or (pairs and pairs + size * size > pair_budget):
            if block_start < k:
                a0, b0 = int(starts[block_start]), int(ends[k - 1])
                f = normalise(state.feats[rows[a0:b0]])
                bounds = [(int(starts[m]) - a0, int(ends[m]) - a0) for m in range(block_start, k)]
                # DBSCAN numbers clusters per call; names share no edges, so ids stay within a name.
                cluster[a0:b0] = _dbscan_block(f, bounds, eps, min_samples, pair_budget)
            block_start, pairs = k, 0
        pairs += size * size

    names: list[str] = []
    ident = np.full(len(rows), -1, dtype=np.int64)
    reason = np.full(len(rows), None, dtype=object)
    ambiguous_names = 0
    for a, b in zip(starts, ends):
        labels = cluster[a:b]
        ranks, tied = _rank_clusters(labels, state.photo[rows[a:b]], top_k, tie_share)
        reason[a:b] = np.where(labels < 0, "dbscan_noise", "not_largest_cluster")
        if tied:
            reason[a:b][labels >= 0] = "ambiguous_name"
            ambiguous_names += 1
            continue
        label_str = state.labels[int(lab[a])]
        for cid, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            members = np.flatnonzero(labels == cid) + a
            ident[members] = len(names)
            reason[members] = None
            names.append(identity_name(label_str, rank))

    state.names = names
    state.ident[rows] = ident
    dropped = ident < 0
    state.reason[rows[dropped]] = reason[dropped]
    same_photo = _one_detection_per_photo(state)
    return {"names": int(len(starts)), "identities": len(names), "ambiguous_names": ambiguous_names,
            "same_photo": same_photo}


_PHOTO_CHUNK = 4096  # rows per chunk of the one-detection-per-photo step (8 MiB of float32 at 512-d)


def _one_detection_per_photo(state: CleanState) -> int:
    """Keep, for each photo in an identity, the detection closest to the identity's mean face
    (ties: higher face score, then person_id order); the others are `same_photo`.

    Linear in the kept rows (a bincount of photos and a lookup of identities), then sorts only the rows of
    identities holding a repeated photo; their mean faces come from one grouped sum.
    """
    rows = np.flatnonzero(state.kept())
    if len(rows) < 2:
        return 0
    # Linear pre-filter: only photos with two or more kept rows can repeat inside an identity.
    many = np.bincount(state.photo[rows], minlength=int(state.photo.max()) + 1)[state.photo[rows]] > 1
    cand = rows[many]
    if not len(cand):
        return 0
    key = state.ident[cand] * (int(state.photo.max()) + 1) + state.photo[cand]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        return 0
    # Only identities holding a repeated photo need their mean face (a lookup table: linear in rows).
    marked = np.zeros(max(len(state.names), int(state.ident.max()) + 1), dtype=bool)
    marked[state.ident[cand][counts[inverse] > 1]] = True
    rows = rows[marked[state.ident[rows]]]
    key = state.ident[rows] * (int(state.photo.max()) + 1) + state.photo[rows]
    ids, local = np.unique(state.ident[rows], return_inverse=True)
    # Mean faces, then each row's closeness to its identity's, in chunks of rows: the float32 copy of the
    # features stays a few MiB (cache-sized, whatever the number of rows), so time grows linearly.
    centres = np.zeros((len(ids), state.feats.shape[1]), dtype=np.float32)
    for a in range(0, len(rows), _PHOTO_CHUNK):
        sl = slice(a, a + _PHOTO_CHUNK)
        n = len(rows[sl])
        pick = sp.csr_matrix((np.ones(n, dtype=np.float32), (local[sl], np.arange(n))), shape=(len(ids), n))
        centres += pick @ normalise(state.feats[rows[sl]])
    centres = normalise(centres)
    closeness = np.empty(len(rows), dtype=np.float32)
    for a in range(0, len(rows), _PHOTO_CHUNK):
        sl = slice(a, a + _PHOTO_CHUNK)
        closeness[sl] = np.einsum("ij,ij->i", normalise(state.feats[rows[sl]]), centres[local[sl]])
    order = np.lexsort((state.order_key[rows], -state.face_score[rows], -closeness, key))
    k = key[order]
    first = np.r_[True, k[1:] != k[:-1]]
    drop = np.zeros(state.n, dtype=bool)
    drop[rows[order[~first]]] = True
    return state.drop(drop, "same_photo")
