"""Step 5: validation-overlap removal against center files from `webbody valsets build`.

An identity whose center is more similar than `threshold` to a validation center of two or more images,
or than `threshold - SINGLE_IMAGE_MARGIN` to a center of one image, is dropped with the reason
`val_overlap:<set>` (the set of its best match). A one-image center (a .bin pair set's photo) is a noisy
estimate of its person: its cosine to the person's identity is lower than a folder mean's (docs/clean.md).
A center file made with another embedder is refused: cosines between two embedders' spaces mean nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.clean.merge import identity_centers
from pipeline.clean.search import best_match
from pipeline.clean.state import CleanState, normalise
from pipeline.stage import StageError
from schemas.base import SchemaError
from schemas.clean import VALSET_CENTERS

# How much lower the threshold is for a validation center made of one image (chosen on the quality
# benchmark's development seeds 100-109, never on the reported ones; docs/clean.md).
SINGLE_IMAGE_MARGIN = 0.01


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


def overlap_verdicts(state: CleanState, valsets: list[ValSet], threshold: float, block: int,
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
        one = vs.n_images <= 1 if vs.n_images is not None else np.zeros(len(vs.centers), dtype=bool)
        sims = np.full(len(ids), -np.inf, dtype=np.float32)
        hit = np.zeros(len(ids), dtype=bool)
        for part, thr in ((~one, threshold), (one, threshold - SINGLE_IMAGE_MARGIN)):
            if part.any():
                s, _ = best_match(centers, vs.centers[part], block)
                hit |= s > thr
                sims = np.maximum(sims, np.where(s > thr, s, -np.inf))
        hits[:, k] = hit
        better = hit & (sims > best)
        best[better] = sims[better]
        best_set[better] = k
    return ids, best_set, hits


def remove_val_overlap(state: CleanState, valsets: list[ValSet], threshold: float, block: int,
                       weighting: str) -> dict:
    """Drop identities matching any validation center; report per set centers, identities, images."""
    report = {vs.name: {"file": vs.path, "centers": len(vs.centers), "identities": 0, "images": 0,
                        "matched": 0} for vs in valsets}
    if not valsets:
        return report
    ids, best_set, hits = overlap_verdicts(state, valsets, threshold, block, weighting)
    for k, vs in enumerate(valsets):
        report[vs.name]["matched"] = int(hits[:, k].sum())  # identities over the threshold for this set
        victims = ids[best_set == k]
        report[vs.name]["identities"] = int(len(victims))
        report[vs.name]["images"] = state.drop_identities(victims, f"val_overlap:{vs.name}")
    return report
