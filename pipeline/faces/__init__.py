"""Faces stage: upper-body pre-crop, face detection (RetinaFace/SCRFD ONNX), ArcFace alignment, embedding.

`run()` is the registry entry point (`webbody stage faces`, the `webbody-build` flow).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.faces.stage import FacesStage, decode_feature, feature_columns
from pipeline.inference import worker_threads


def stage_for(cfg: BuildConfig) -> FacesStage:
    """The faces stage of a build, with its runtimes' thread count fitted to the executor's workers."""
    faces = cfg.faces
    if faces.num_threads is None and cfg.run.executor != "local" and not cfg.run.num_actors:
        # A pool sized from the cluster packs CPUs / actor_cpus actors on each node: each runtime gets its actor's
        # CPU share, not the library default of every core of the node (which oversubscribes it many times).
        faces = faces.model_copy(update={"num_threads": worker_threads(cfg)})
    return FacesStage(faces)


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Run the faces stage over every finished persons shard; returns the roll-up stats."""
    from pipeline.registry import executor_from_config

    stage = stage_for(cfg)
    stage.resolve_paths()  # fail fast on the driver: a missing weight is reported before any worker starts
    summary = executor_from_config(cfg).run(stage, inputs["persons"], output, overwrite)
    return summary.stats


__all__ = ["FacesStage", "decode_feature", "feature_columns", "run", "stage_for"]
