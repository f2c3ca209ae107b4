"""A face embedder added from outside the package: this file and its decorator are all it takes (named in a
config's `plugins`, tests/test_registry.py). "grey8": the aligned 112 px face as an 8x8 grey thumbnail, a
64-d feature with thresholds of its own. Not a face recogniser: it shows the seam."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.faces.embedders import FaceCrop, register_embedder

THRESHOLDS = {"dbscan_eps": 0.02, "dbscan_min_samples": 1, "merge": 0.995, "ambiguous": 0.99,
              "val_overlap": 0.995, "duplicate": 0.999}


class Grey8:
    name = "grey8"
    dim = 64

    def embed(self, faces: list[FaceCrop]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        thumbs = [cv2.resize(cv2.cvtColor(f.aligned, cv2.COLOR_RGB2GRAY), (8, 8), interpolation=cv2.INTER_AREA)
                  for f in faces]
        return np.stack(thumbs).reshape(len(faces), -1).astype(np.float32) / 255.0 + 0.01


@register_embedder("grey8", default_weights=None, thresholds=THRESHOLDS)
def grey8(cfg, weights: Path | None, extras: dict[str, Path], backend: str) -> Grey8:
    return Grey8()
