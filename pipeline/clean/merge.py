"""Step 3: identity centers, transitive merging of similar identities, and the ambiguous-pair rule.

Merging is a fixpoint of connected components: pairs of centers with cosine > `merge` form a graph, every
connected component becomes one identity (a->b->c ends in one identity, whatever the component's size),
centers are recomputed and the search repeats until no pair is above `merge`. Only then are ambiguous
pairs (cosine in (`ambiguous`, `merge`]) looked at, on the merged identities, and the smaller member of
each is dropped. (The reference remapped labels one hop, agglomerated only components of 3..10 000 and
deleted unmerged members; it also decided ambiguity before merging.)
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from pipeline.clean.search import pairs_above
from pipeline.clean.state import CleanState, normalise

_CHUNK = 262_144  # rows per chunk when summing features into centers (bounds the float32 copy)


def identity_centers(state: CleanState, weighting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity ids, normalised centers, image counts) of the kept identities, ids ascending.

    "norm" weighting sums raw features (normalised feature x its norm), the reference's rule; "mean" sums
    the normalised features.
    """
    ids, sums, counts = identity_sums(state, weighting)
    return ids, normalise(sums), counts


def identity_sums(state: CleanState, weighting: str, within: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identity ids, weighted feature sums (float32, not normalised), image counts) of the kept rows,
    optionally only those in the boolean mask `within` (one shard's rows: sums of shards add up)."""
    kept = state.kept() if within is None else state.kept() & within
    rows = np.flatnonzero(kept)
    ids, local = np.unique(state.ident[rows], return_inverse=True)
    centers = np.zeros((len(ids), state.feats.shape[1]), dtype=np.float32)
    weights = state.norms[rows] if weighting == "norm" else np.ones(len(rows), dtype=np.float32)
    for start in range(0, len(rows), _CHUNK):
        sl = slice(start, start + _CHUNK)
        n = len(rows[sl])
        # A sparse (identity x row) weight matrix times the rows' features: a fast grouped weighted sum.
        pick = sp.csr_matrix((weights[sl].astype(np.float32), (local[sl], np.arange(n))), shape=(len(ids), n))
        centers += pick @ state.feats[rows[sl]].astype(np.float32)
    counts = np.bincount(local, minlength=len(ids))
    return ids, centers, counts


def _representative(members: np.ndarray, counts: np.ndarray, names: list[str]) -> int:
    """The member whose id the merged identity keeps: most images, then the smallest id string."""
    return min(members, key=lambda m: (-int(counts[m]), names[int(m)]))


def _smaller(a: int, b: int, counts: np.ndarray, ids: np.ndarray, names: list[str]) -> int:
    """The identity id of the pair's loser: fewer images, then the larger id string."""
    if counts[a] != counts[b]:
        return int(ids[a] if counts[a] < counts[b] else ids[b])
    return int(ids[a] if names[int(ids[a])] > names[int(ids[b])] else ids[b])


def merge_identities(state: CleanState, merge: float, ambiguous: float, block: int, weighting: str) -> dict:
    rounds = merged = 0
    while True:
        ids, centers, counts = identity_centers(state, weighting)
        i, j, s = pairs_above(centers, ambiguous, block)
        strong = s > merge
        if not strong.any():
            break
        rounds += 1
        graph = sp.csr_matrix((np.ones(int(strong.sum())), (i[strong], j[strong])), shape=(len(ids), len(ids)))
        _, comp = connected_components(graph, directed=False)
        # Components of every size go the same way: all members take the representative's identity.
        multi = np.flatnonzero(np.bincount(comp)[comp] > 1)
        order = multi[np.argsort(comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1]])
        remap = ids.copy()
        id_names = [state.names[int(x)] for x in ids]
        for members in np.split(order, bounds[1:]):
            rep = _representative(members, counts, id_names)
            remap[members] = ids[rep]
            merged += len(members) - 1
        lookup = np.full(len(state.names), -1, dtype=np.int64)
        lookup[ids] = remap
        kept = state.kept()
        state.ident[kept] = lookup[state.ident[kept]]

    # No pair is above `merge` now: every pair found is ambiguous. Drop the smaller of each (fewer images,
    # then the larger id string), decided on the final merged identities.
    losers = {_smaller(int(a), int(b), counts, ids, state.names) for a, b in zip(i, j)}
    dropped_images = state.drop_identities(np.array(sorted(losers), dtype=np.int64), "ambiguous_identity")
    return {
        "merge_rounds": rounds,
        "identities_merged_away": merged,
        "ambiguous_pairs": int(len(i)),
        "ambiguous_identities_dropped": len(losers),
        "ambiguous_images_dropped": dropped_images,
    }



def merge_centers(names: list[str], sums: np.ndarray, counts: np.ndarray, merge: float, ambiguous: float,
                  block: int) -> tuple[dict[str, str], set[str], dict]:
    """`merge_identities` on identity centers alone (one weighted feature sum per identity, summed over
    shards): the cross-identity step of the partitioned stage, small next to the rows.

    Returns (identity -> the identity it merges into, for those merged away; the identities dropped as
    `ambiguous_identity` (final ids); the report). The rules are `merge_identities`'s: components of
    pairs above `merge` (scipy connected components) take the representative's id (most images, then the
    smallest id string), centers are re-summed and the search repeats until no pair is above `merge`.
    """
    names = list(names)
    sums = np.asarray(sums, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    into: dict[str, str] = {}
    rounds = merged = 0
    while True:
        i, j, s = pairs_above(normalise(sums), ambiguous, block)
        strong = s > merge
        if not strong.any():
            break
        rounds += 1
        n = len(names)
        graph = sp.csr_matrix((np.ones(int(strong.sum())), (i[strong], j[strong])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        rep_of = np.arange(n)
        for c in np.unique(comp[np.bincount(comp)[comp] > 1]):
            members = np.flatnonzero(comp == c)
            rep = _representative(members, counts, names)
            rep_of[members] = rep
            merged += len(members) - 1
        keep = np.flatnonzero(rep_of == np.arange(n))
        new_index = np.full(n, -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        target = new_index[rep_of]
        for m in np.flatnonzero(rep_of != np.arange(n)):
            into[names[int(m)]] = names[int(rep_of[m])]
        new_sums = np.zeros((len(keep), sums.shape[1]), dtype=np.float32)
        np.add.at(new_sums, target, sums)
        counts = np.bincount(target, weights=counts, minlength=len(keep)).astype(np.int64)
        sums, names = new_sums, [names[int(k)] for k in keep]
    # Chains (a into b, b later into c) end at the final identity.
    for a in list(into):
        b = into[a]
        while b in into:
            b = into[b]
        into[a] = b
    idx = np.arange(len(names))
    losers = {names[_smaller_index(int(a), int(b), counts, names)] for a, b in zip(idx[i], idx[j])}
    lost = sum(int(counts[k]) for k in range(len(names)) if names[k] in losers)
    report = {"merge_rounds": rounds, "identities_merged_away": merged, "ambiguous_pairs": int(len(i)),
              "ambiguous_identities_dropped": len(losers), "ambiguous_images_dropped": lost}
    return into, losers, report


def _smaller_index(a: int, b: int, counts: np.ndarray, names: list[str]) -> int:
    """`_smaller` on positions of one identity list."""
    if counts[a] != counts[b]:
        return a if counts[a] < counts[b] else b
    return a if names[a] > names[b] else b
