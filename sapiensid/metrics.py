"""Re-identification metrics: CMC (top-k) and mAP under the general, same-clothes and clothes-changing protocols.

Rules (Market-1501 / CAL style, see docs/training.md):

- gallery items are ranked by descending cosine similarity to the query; ties keep gallery order (stable sort),
  so results never depend on a sort implementation;
- ``general``: good = same pid and different camera; junk = same pid and same camera;
- ``same_clothes``: good = same pid, different camera, same clothes; junk = same pid and (same camera or
  different clothes);
- ``clothes_changing``: good = same pid, different camera, different clothes; junk = same pid and (same camera
  or same clothes);
- if every camera id (query and gallery) is -1, cameras are ignored: no camera junk, good needs no camera change;
- a gallery item that *is* the query (same ``item id``) is always junk;
- junk items are removed from the ranking; queries with no good match are excluded from every average;
- CMC@k = share of queries whose first good match is within the first k kept items; AP = mean over the good
  matches of the precision at their rank. Both are reported x100.

The similarity matrix is computed in query blocks so the memory is O(block x gallery), not O(query x gallery).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROTOCOLS = ("general", "same_clothes", "clothes_changing")
DEFAULT_RANKS = (1, 5, 10, 20)


@dataclass
class ReIDSet:
    """Embeddings and labels of one side (query or gallery) of a ReID evaluation."""

    features: np.ndarray  # (N, D), L2-normalised or not (normalised here)
    pids: np.ndarray  # (N,) int identity ids
    camids: np.ndarray  # (N,) int camera (or tracklet) ids, -1 unknown
    clothes: np.ndarray | None = None  # (N,) int clothes ids, needed by the clothes protocols
    item_ids: np.ndarray | None = None  # (N,) ids of the underlying images, to drop self-matches

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        n = len(self.features)
        self.pids = np.asarray(self.pids, dtype=np.int64).reshape(-1)
        self.camids = np.asarray(self.camids, dtype=np.int64).reshape(-1)
        if self.clothes is not None:
            self.clothes = np.asarray(self.clothes, dtype=np.int64).reshape(-1)
        if self.item_ids is not None:
            self.item_ids = np.asarray(self.item_ids).reshape(-1)
        for name in ("pids", "camids", "clothes", "item_ids"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"ReIDSet: {name} has {len(arr)} entries for {n} features")


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _good_and_junk(
    protocol: str,
    same_pid: np.ndarray,
    same_cam: np.ndarray,
    same_clothes: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (good, junk) masks of one block, following the rules in the module docstring."""
    if protocol == "general":
        good = same_pid & ~same_cam
        junk = same_pid & same_cam
    elif protocol == "same_clothes":
        assert same_clothes is not None
        good = same_pid & ~same_cam & same_clothes
        junk = same_pid & (same_cam | ~same_clothes)
    elif protocol == "clothes_changing":
        assert same_clothes is not None
        good = same_pid & ~same_cam & ~same_clothes
        junk = same_pid & (same_cam | same_clothes)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    return good, junk


def rank_queries(
    similarity: np.ndarray,
    q: ReIDSet,
    g: ReIDSet,
    protocol: str = "general",
    q_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """For a block of queries (rows of `similarity`, starting at query `q_offset`): the 0-based rank of the
    first good match among kept items (-1 if none) and the average precision (nan if no good match)."""
    nq = similarity.shape[0]
    rows = slice(q_offset, q_offset + nq)
    # Stable sort of the negated similarity: equal similarities keep gallery order.
    order = np.argsort(-similarity, axis=1, kind="stable")
    same_pid = g.pids[order] == q.pids[rows, None]
    ignore_cams = bool(np.all(q.camids == -1) and np.all(g.camids == -1))
    same_cam = np.zeros_like(same_pid) if ignore_cams else g.camids[order] == q.camids[rows, None]
    same_clothes = None
    if protocol != "general":
        if q.clothes is None or g.clothes is None:
            raise ValueError(f"protocol {protocol!r} needs clothes ids on query and gallery")
        same_clothes = g.clothes[order] == q.clothes[rows, None]
    good, junk = _good_and_junk(protocol, same_pid, same_cam, same_clothes)
    if q.item_ids is not None and g.item_ids is not None:
        junk |= g.item_ids[order] == q.item_ids[rows, None]
        good &= ~junk
    keep = ~junk
    good_kept = good & keep
    kept_rank = np.cumsum(keep, axis=1)  # 1-based rank among kept items, valid where keep is True
    n_good = good_kept.sum(axis=1)
    first = np.full(nq, -1, dtype=np.int64)
    has_good = n_good > 0
    first_pos = np.argmax(good_kept, axis=1)
    first[has_good] = kept_rank[has_good, first_pos[has_good]] - 1
    hits = np.cumsum(good_kept, axis=1)
    precision = np.where(good_kept, hits / np.maximum(kept_rank, 1), 0.0)
    ap = np.full(nq, np.nan)
    ap[has_good] = precision[has_good].sum(axis=1) / n_good[has_good]
    return first, ap


def evaluate_reid(
    q: ReIDSet,
    g: ReIDSet,
    protocol: str = "general",
    ranks: Sequence[int] = DEFAULT_RANKS,
    block: int = 1024,
) -> dict[str, float]:
    """CMC top-k and mAP (x100) for `protocol`; also the number of valid and excluded queries."""
    qf = _normalise(q.features)
    gf = _normalise(g.features)
    firsts, aps = [], []
    for start in range(0, len(qf), block):
        sim = qf[start : start + block] @ gf.T
        f, a = rank_queries(sim, q, g, protocol, q_offset=start)
        firsts.append(f)
        aps.append(a)
    first = np.concatenate(firsts) if firsts else np.zeros(0, dtype=np.int64)
    ap = np.concatenate(aps) if aps else np.zeros(0)
    valid = first >= 0
    n_valid = int(valid.sum())
    out: dict[str, float] = {"num_query": int(len(first)), "num_valid_query": n_valid}
    if n_valid == 0:
        # Nothing measurable: report NaN rather than a misleading 0.
        for r in ranks:
            out[f"top{r}"] = float("nan")
        out["mAP"] = float("nan")
        return out
    for r in ranks:
        out[f"top{r}"] = float(100.0 * np.mean(first[valid] < r))
    out["mAP"] = float(100.0 * np.mean(ap[valid]))
    return out


def evaluate_protocols(
    q: ReIDSet,
    g: ReIDSet,
    protocols: Sequence[str] | None = None,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[str, dict[str, float]]:
    """Every applicable protocol: the clothes ones only when both sides carry clothes ids."""
    if protocols is None:
        has_clothes = q.clothes is not None and g.clothes is not None
        protocols = PROTOCOLS if has_clothes else ("general",)
    return {p: evaluate_reid(q, g, p, ranks) for p in protocols}
