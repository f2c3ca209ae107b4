"""The in-memory state of the global clean computation: features and a verdict per faces row.

Rows are kept in input order (shard after shard) so the verdicts go back to the shard each row came from.
Every step only narrows the selection: it sets `ident` to -1 and writes a reason for the rows it drops,
and never touches rows already dropped, so each dropped row carries the reason of the first step that
dropped it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DROPPED = -1


@dataclass
class CleanState:
    feats: np.ndarray  # (N, D) float16, L2-normalised (zero rows for unusable features)
    norms: np.ndarray  # (N,) float32, L2 norm of the raw feature (center weighting)
    label: np.ndarray  # (N,) int64 index into `labels` (sorted, so codes follow string order)
    labels: list[str]
    photo: np.ndarray  # (N,) int64 code of sample_id: one photo of one name
    face_score: np.ndarray  # (N,) float32
    order_key: np.ndarray  # (N,) int64 rank of person_id: the tie-break of every choice
    ident: np.ndarray = field(default=None)  # (N,) int64 identity index into `names`, or DROPPED
    reason: np.ndarray = field(default=None)  # (N,) object: None while kept, else the reason code
    names: list[str] = field(default_factory=list)  # identity index -> stable identity id
    # Perceptual hashes of each row's face patch and of its mirror (uint64, 0 = none), or None when the
    # stage ran without the persons crops; see pipeline/clean/copies.py.
    hash: np.ndarray | None = None
    hash_flip: np.ndarray | None = None
    # The encoded body crop of each row (bytes or None), for local-feature matching of copies.
    crops: np.ndarray | None = None
    copy_of: np.ndarray = field(default=None)  # (N,) int64 row a `near_duplicate` row copies, else -1

    def __post_init__(self) -> None:
        n = len(self.label)
        if self.ident is None:
            self.ident = np.zeros(n, dtype=np.int64)
        if self.reason is None:
            self.reason = np.full(n, None, dtype=object)
        if self.copy_of is None:
            self.copy_of = np.full(n, -1, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self.label)

    def kept(self) -> np.ndarray:
        return self.ident != DROPPED

    def drop(self, mask: np.ndarray, reason: str) -> int:
        """Drop the still-kept rows in `mask` with `reason`; returns how many were dropped."""
        hit = mask & self.kept()
        self.ident[hit] = DROPPED
        self.reason[hit] = reason
        return int(hit.sum())

    def drop_identities(self, idents: np.ndarray, reason: str) -> int:
        if len(idents) == 0:
            return 0
        return self.drop(np.isin(self.ident, idents), reason)

    def funnel_row(self, step: str) -> dict:
        kept = self.ident[self.kept()]
        return {"step": step, "identities": int(len(np.unique(kept))), "images": int(len(kept))}

    def kept_groups(self, secondary: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Kept rows grouped by identity: (identity ids ascending, row indices per identity).

        Within a group rows follow `secondary` (ascending), then `order_key`.
        """
        rows = np.flatnonzero(self.kept())
        keys = [self.order_key[rows]]
        if secondary is not None:
            keys.append(secondary[rows])
        keys.append(self.ident[rows])
        rows = rows[np.lexsort(keys)]
        ids, starts = np.unique(self.ident[rows], return_index=True)
        return ids, np.split(rows, starts[1:]) if len(rows) else []


def normalise(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)
