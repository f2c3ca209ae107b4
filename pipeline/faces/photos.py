"""Faces of whole photos: pad to a square, detect, align to the ArcFace template, embed.

The one chain for photos that are not body crops: `webbody remove --face` (the largest face of a user's
photo) and the validation-set centers of `pipeline/valsets.py` (the best face of each photo). The faces
stage itself works on body crops with an upper-body pre-crop and its own canvas (`pipeline/faces/stage.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.faces.align import (
    AlignError,
    pad_to_square,
    similarity_to_template,
    transform_points,
    warp_face,
)
from pipeline.faces.embedders import FaceCrop


@dataclass
class PhotoFace:
    """The chosen face of one photo: its feature, or why there is none (`no_face`, `align_error`)."""

    feature: np.ndarray | None
    reason: str | None = None
    error: str | None = None


def photo_faces(detector, embedder, images: list[np.ndarray], *, pick: Literal["best", "largest"] = "best",
                score_threshold: float = 0.0) -> list[PhotoFace]:
    """One face per RGB photo: the detector's best (`best`) or the largest box (`largest`), embedded."""
    squares = [pad_to_square(img, value=0) for img in images]
    max_faces = 1 if pick == "best" else None
    found = detector.detect_batch([s for s, _, _ in squares], max_faces=max_faces, score_threshold=score_threshold)
    out = [PhotoFace(None, "no_face") for _ in images]
    crops, where = [], []
    for k, ((square, left, top), dets) in enumerate(zip(squares, found)):
        if not dets:
            continue
        det = dets[0] if pick == "best" else max(dets, key=lambda d: float(np.prod(d.box[2:] - d.box[:2])))
        try:
            matrix = similarity_to_template(det.landmarks)
        except AlignError as exc:
            out[k] = PhotoFace(None, "align_error", str(exc))
            continue
        box = det.box.reshape(2, 2) - np.array([left, top], np.float32)  # back in the photo's own pixels
        crops.append(FaceCrop(warp_face(square, matrix), transform_points(det.landmarks, matrix), images[k],
                              box.reshape(4)))
        where.append(k)
    for k, feat in zip(where, embedder.embed(crops) if crops else []):
        out[k] = PhotoFace(np.asarray(feat, np.float32))
    return out
