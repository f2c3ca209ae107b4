"""The clean steps in order, on an in-memory state: the pure heart of the stage (no files).

0. copies of one photo within a name are one photo (perceptual hashes of the face patch)
1. per-name DBSCAN, top-k clusters (ties: no identity), one detection per photo
                                                              4. near-duplicates within an identity
2. face-score filter                                          5. validation-overlap removal
3. transitive merge of similar identities, ambiguous rule     6. identities with too few images
After each step the funnel records the identities and images left.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline.clean.cluster import cluster_names
from pipeline.clean.copies import collapse_copies
from pipeline.clean.dedup import drop_near_duplicates
from pipeline.clean.merge import merge_identities
from pipeline.clean.overlap import ValSet, remove_val_overlap
from pipeline.clean.state import CleanState
from pipeline.config import CleanConfig, EmbedderThresholds

log = logging.getLogger(__name__)


def resolve_thresholds(cfg: CleanConfig, embedder: str | None) -> EmbedderThresholds:
    """Per field: the config's value where it sets one, else the thresholds the embedder registered with
    (pipeline/faces/embedders.py), else the official (kprpe) values. A config that sets a few fields of
    dlib's thresholds keeps dlib's scale for the others, not the cosine embedders' defaults."""
    from pipeline.faces.embedders import EMBEDDERS

    if embedder is None:
        return EmbedderThresholds()
    entry = EMBEDDERS.get(embedder)
    merged = dict(entry.thresholds) if entry is not None else {}
    if embedder in cfg.thresholds:
        merged.update(cfg.thresholds[embedder].model_dump(exclude_unset=True))
    return EmbedderThresholds.model_validate(merged)


def clean_selection(state: CleanState, cfg: CleanConfig, thr: EmbedderThresholds,
                    valsets: list[ValSet]) -> dict:
    """Run steps 1-6 on `state` in place; returns the funnel and each step's report."""
    usable = state.kept()
    funnel = [{"step": "input", "identities": int(len(np.unique(state.label[usable]))),
               "images": int(usable.sum())}]
    report: dict = {}
    clock = [time.perf_counter()]

    def row(step: str) -> dict:
        now = time.perf_counter()
        counts = state.funnel_row(step)
        if step == "copies":  # before clustering, identities are still the names
            counts["identities"] = int(len(np.unique(state.label[state.kept()])))
        out = {**counts, "seconds": round(now - clock[0], 3)}
        clock[0] = now
        return out

    report["copies"] = collapse_copies(state, cfg.copy_hash_distance, 1.0 - thr.dbscan_eps)
    funnel.append(row("copies"))

    report["cluster"] = cluster_names(state, thr.dbscan_eps, thr.dbscan_min_samples, cfg.top_k_clusters,
                                      cfg.dbscan_pair_budget, cfg.tie_share)
    funnel.append(row("cluster"))

    report["face_score"] = {"dropped": state.drop(~(state.face_score > cfg.face_score), "low_face_score")}
    funnel.append(row("face_score"))

    report["merge"] = merge_identities(state, thr.merge, thr.ambiguous, cfg.block_size, cfg.center_weighting)
    funnel.append(row("merge"))

    report["dedup"] = drop_near_duplicates(state, thr.duplicate)
    funnel.append(row("near_duplicates"))

    report["val_overlap"] = remove_val_overlap(state, valsets, thr.val_overlap, thr.val_overlap_image,
                                               cfg.block_size, cfg.center_weighting)
    funnel.append(row("val_overlap"))

    ids, counts = np.unique(state.ident[state.kept()], return_counts=True)
    report["min_images"] = {"dropped": state.drop_identities(ids[counts < cfg.min_images], "too_few_images")}
    funnel.append(row("min_images"))

    for row in funnel:
        log.info("clean %-16s identities %9d images %10d", row["step"], row["identities"], row["images"])
    return {"funnel": funnel, "steps": report}


def identity_strings(state: CleanState) -> np.ndarray:
    """Final identity id per row (None when dropped)."""
    out = np.full(state.n, None, dtype=object)
    kept = state.kept()
    names = np.asarray(state.names, dtype=object)
    out[kept] = names[state.ident[kept]] if len(names) else None
    return out
