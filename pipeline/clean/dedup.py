"""Step 4: near-duplicate images within an identity.

Images of one identity are visited best first (face score, then person_id); an image is kept unless it is
more similar than `threshold` to an image already kept. The kept set therefore has no pair above the
threshold and keeps the best copy of each duplicate group. Identities of any size go the same way, in
blocks of `block` rows (the reference skipped identities above 4096 images).
"""

from __future__ import annotations

import numpy as np

from pipeline.clean.state import CleanState, normalise

BLOCK = 4096  # rows per block: a block's similarity matrix is BLOCK x BLOCK float32 (64 MiB)


def _greedy_block(sims: np.ndarray, alive: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy keep inside one block, in row order; `alive` marks rows not already beaten by earlier blocks."""
    keep = alive.copy()
    dup = np.triu(sims > threshold, 1)
    for r in np.flatnonzero(dup.any(axis=1)):
        if keep[r]:
            keep[r + 1:] &= ~dup[r, r + 1:]
    return keep


def dedup_rows(f: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Keep mask over the rows of `f` (normalised float32, best first)."""
    n = len(f)
    keep = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        fb = f[start:start + block]
        alive = np.ones(len(fb), dtype=bool)
        kept_before = np.flatnonzero(keep[:start])
        # Compare against earlier kept rows chunk by chunk: memory stays block x block.
        for k in range(0, len(kept_before), block):
            earlier = f[kept_before[k:k + block]]
            alive &= ~((fb @ earlier.T) > threshold).any(axis=1)
        keep[start:start + len(fb)] = _greedy_block(fb @ fb.T, alive, threshold)
    return keep


def drop_near_duplicates(state: CleanState, threshold: float, block: int = BLOCK) -> dict:
    drop = np.zeros(state.n, dtype=bool)
    _, groups = state.kept_groups(secondary=-state.face_score)
    for rows in groups:
        if len(rows) < 2:
            continue
        keep = dedup_rows(normalise(state.feats[rows]), threshold, block)
        drop[rows[~keep]] = True
    return {"near_duplicates": state.drop(drop, "near_duplicate")}
