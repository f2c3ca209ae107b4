"""A face detector added from outside the package: this file and its decorator are all it takes (named in a
config's `plugins`, tests/test_registry.py). "centre": one face per canvas, the middle third of the picture's
content, with the ArcFace template's landmarks in it. Not a face detector: it shows the seam."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.faces.align import ARCFACE_112
from pipeline.faces.detectors import Detection, register_detector


class Centre:
    def __init__(self, input_size: int):
        self.input_size = input_size

    def detect_batch(self, images: list[np.ndarray], max_faces: int | None = 1, score_threshold: float = 0.0,
                     native: bool = False) -> list[list[Detection]]:
        out = []
        for img in images:
            # the stage letterboxes into the top-left of a black canvas: find the picture's extent
            rows, cols = np.nonzero(img.max(axis=2) > 0)
            if rows.size == 0:
                out.append([])
                continue
            h, w = rows.max() + 1, cols.max() + 1
            side = min(h, w) / 3
            x1, y1 = (w - side) / 2, (h - side) / 2
            landmarks = (ARCFACE_112 / 112.0 * side + [x1, y1]).astype(np.float32)
            out.append([Detection(np.array([x1, y1, x1 + side, y1 + side], np.float32), landmarks, 0.75)])
        return out


@register_detector("centre", default_weights=None)
def centre(cfg, weights: Path | None, backend: str) -> Centre:
    return Centre(cfg.detector_input)
