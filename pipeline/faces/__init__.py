"""Faces stage: upper-body pre-crop, face detection (RetinaFace/SCRFD ONNX), ArcFace alignment, embedding.

`run()` is the registry entry point (`webbody stage faces`, the `webbody-build` flow).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.faces.stage import FacesStage, decode_feature, feature_columns


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Run the faces stage over every finished persons shard; returns the roll-up stats."""
    from pipeline.registry import executor_from_config

    stage = FacesStage(cfg.faces)
    stage.resolve_paths()  # fail fast on the driver: a missing weight is reported before any worker starts
    summary = executor_from_config(cfg).run(stage, inputs["persons"], output, overwrite)
    return summary.stats


__all__ = ["FacesStage", "decode_feature", "feature_columns", "run"]
