"""Step 5: validation-overlap removal against center files from `webbody valsets build`.

An identity is dropped with the reason `val_overlap:<set>` (the set of its best match) when
- its center is more similar than `threshold + CENTER_MARGIN` to a validation center, or
- the center is made of one image (a .bin pair set's photo: a noisy estimate of its person, often of another
  age or domain), the identity's center is above `threshold - CANDIDATE_FLOOR` to it, and the image is as
  close to the identity's photos as they are to each other (`member_ratio` above `image_ratio`, the
  `val_overlap_image` threshold of the config): over the identity's typical photos (nearest-photo cosine at
  least the identity's median), the mean of the TOP_MEMBERS highest cos(image, photo) / cos(photo, its nearest
  other photo);
- a center file without image counts gets the official rule (center above `threshold`).
The constants and the default `val_overlap_image` were chosen on the quality benchmark's development seeds
(100-139), never on the reported ones (docs/clean.md), for recall first: a validation person left in the
training data inflates every verification figure, a look-alike removed costs one training identity. No rule
on the identity's photos reaches both overlap targets there (docs/clean.md, "What bounds the overlap
figures"). A center file made with another embedder is refused: cosines between two embedders' spaces mean
nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.clean.merge import identity_centers
from pipeline.clean.search import best_match, pairs_between
from pipeline.clean.state import CleanState, normalise
from pipeline.stage import StageError
from schemas.base import SchemaError
from schemas.clean import VALSET_CENTERS

# The rule's constants (chosen on the quality benchmark's development seeds 100-139; docs/clean.md). The
# member-ratio cut is the config's `val_overlap_image` (pipeline/config.py), so users choose the trade-off.
CENTER_MARGIN = 0.025  # any center matches on the center cosine alone above threshold + this
CANDIDATE_FLOOR = 0.15  # a one-image center is looked at image by image from threshold - this
TOP_MEMBERS = 8  # how many of the identity's best-matching typical photos are compared


@dataclass
class ValSet:
    name: str
    path: str
    embedder: str
    embedder_config: dict
    items: list[str]
    centers: np.ndarray  # (M, D) float32, normalised
    n_images: np.ndarray | None = None  # (M,) images behind each center; None: unknown (official threshold)


def read_valset(path: str | Path) -> ValSet:
    """Read one center file; every row must name the same set and embedder."""
    p = Path(path)
    if not p.exists():
        raise StageError(f"validation center file {p} not found: build it with `webbody valsets build`")
    try:
        table = VALSET_CENTERS.validate(pq.read_table(p), where=str(p))
    except SchemaError as exc:
        raise StageError(f"{p} is not a validation center file: {exc}") from exc
    if table.num_rows == 0:
        raise StageError(f"validation center file {p} holds no centers")
    sets = set(table.column("set").to_pylist())
    embedders = set(table.column("embedder").to_pylist())
    configs = set(table.column("embedder_config").to_pylist())
    if len(sets) != 1 or len(embedders) != 1 or len(configs) != 1:
        raise StageError(f"{p} mixes sets {sorted(sets)} / embedders {sorted(embedders)}: rebuild it")
    centers = np.asarray(table.column("center").to_pylist(), dtype=np.float32)
    return ValSet(
        name=sets.pop(),
        path=str(p),
        embedder=embedders.pop(),
        embedder_config=json.loads(configs.pop()),
        items=table.column("item").to_pylist(),
        centers=normalise(centers),
        n_images=np.asarray(table.column("n_images").to_pylist(), dtype=np.int64),
    )


def load_valsets(paths: list[str], embedder: str, dim: int) -> list[ValSet]:
    sets = [read_valset(p) for p in paths]
    for vs in sets:
        if vs.embedder != embedder:
            raise StageError(
                f"validation centers {vs.path} (set '{vs.name}') were built with embedder '{vs.embedder}', "
                f"but the faces features come from '{embedder}': rebuild them with "
                f"`webbody valsets build --embedder {embedder}` (cosines across embedders mean nothing)"
            )
        if vs.centers.shape[1] != dim:
            raise StageError(
                f"validation centers {vs.path} have dimension {vs.centers.shape[1]}, the features {dim}: "
                "they were built with another model of the same embedder; rebuild them"
            )
    names = [vs.name for vs in sets]
    if len(set(names)) != len(names):
        raise StageError(f"validation sets named twice in clean.valsets: {names}")
    return sets


def member_ratio(photos: np.ndarray, images: np.ndarray) -> np.ndarray:
    """For each validation image (rows of `images`, normalised), how close it is to an identity's photos
    (rows of `photos`, normalised, >= 2) relative to how close they are to each other: per photo
    cos(image, photo) / cos(photo, its nearest other photo), over the typical photos (nearest-photo cosine at
    least the median: an outlying photo with no close fellow would make any image look close), the mean of
    the TOP_MEMBERS highest."""
    g = photos @ photos.T
    np.fill_diagonal(g, -np.inf)
    nearest = np.maximum(g.max(axis=1), 1e-3)
    typical = nearest >= np.median(nearest)
    rel = (images @ photos[typical].T) / nearest[typical][None, :]
    m = min(TOP_MEMBERS, rel.shape[1])
    return np.sort(rel, axis=1)[:, -m:].mean(axis=1)


def _image_level_hits(state: CleanState, ids: np.ndarray, cand_i: np.ndarray, cand_j: np.ndarray,
                      images: np.ndarray, image_ratio: float) -> np.ndarray:
    """Whether each candidate (identity index cand_i into `ids`, image cand_j into `images`) passes the
    member-ratio test; identities with one photo never do (no spread to compare with)."""
    hit = np.zeros(len(cand_i), dtype=bool)
    if not len(cand_i):
        return hit
    gids, groups = state.kept_groups()
    rows_of = dict(zip(gids.tolist(), groups))
    for k in np.unique(cand_i):
        rows = rows_of[int(ids[k])]
        if len(rows) < 2:
            continue
        sel = np.flatnonzero(cand_i == k)
        photos = normalise(state.feats[rows])
        hit[sel] = member_ratio(photos, images[cand_j[sel]]) > image_ratio
    return hit


def _set_scores(state: CleanState, ids: np.ndarray, centers: np.ndarray, vs: ValSet, threshold: float,
                image_ratio: float, block: int) -> np.ndarray:
    """Per identity, the highest center cosine among this set's centers it matches (-inf: none)."""
    if vs.n_images is None:  # no image counts: the official rule
        s, _ = best_match(centers, vs.centers, block)
        return np.where(s > threshold, s, -np.inf).astype(np.float32)
    s, _ = best_match(centers, vs.centers, block)
    sims = np.where(s > threshold + CENTER_MARGIN, s, -np.inf).astype(np.float32)
    one = vs.n_images <= 1
    if one.any():
        images = vs.centers[one]
        i, j, s = pairs_between(centers, images, threshold - CANDIDATE_FLOOR, block)
        hit = _image_level_hits(state, ids, i, j, images, image_ratio)
        np.maximum.at(sims, i[hit], s[hit])
    return sims


def overlap_verdicts(state: CleanState, valsets: list[ValSet], threshold: float, image_ratio: float, block: int,
                     weighting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validation-overlap decision for every kept identity of `state`: (identity ids ascending, the
    index of the set it is removed for or -1, a (identities x sets) bool matrix of the sets it matched).

    Needs all rows of each identity it decides (the whole state in one process; a dedup unit holds every
    row of its identities), nothing of other identities."""
    ids, centers, _ = identity_centers(state, weighting)
    best = np.full(len(ids), -np.inf, dtype=np.float32)
    best_set = np.full(len(ids), -1, dtype=np.int64)
    hits = np.zeros((len(ids), len(valsets)), dtype=bool)
    for k, vs in enumerate(valsets):
        sims = _set_scores(state, ids, centers, vs, threshold, image_ratio, block)
        hit = np.isfinite(sims)
        hits[:, k] = hit
        better = hit & (sims > best)
        best[better] = sims[better]
        best_set[better] = k
    return ids, best_set, hits


def remove_val_overlap(state: CleanState, valsets: list[ValSet], threshold: float, image_ratio: float,
                       block: int, weighting: str) -> dict:
    """Drop identities matching any validation center; report per set centers, identities, images."""
    report = {vs.name: {"file": vs.path, "centers": len(vs.centers), "identities": 0, "images": 0,
                        "matched": 0} for vs in valsets}
    if not valsets:
        return report
    ids, best_set, hits = overlap_verdicts(state, valsets, threshold, image_ratio, block, weighting)
    for k, vs in enumerate(valsets):
        report[vs.name]["matched"] = int(hits[:, k].sum())  # identities over the threshold for this set
        victims = ids[best_set == k]
        report[vs.name]["identities"] = int(len(victims))
        report[vs.name]["images"] = state.drop_identities(victims, f"val_overlap:{vs.name}")
    return report
