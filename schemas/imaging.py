"""Image decoding and the white-padding rule, shared by the pipeline and sapiensid (which may depend only on
`schemas`): one decoder for downloaded images, body crops, validation images and bundle samples, and one
definition of what counts as the bundle's white padding.

cv2 is imported lazily so that the schema validators do not load it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A row (or column) of an image is white padding when the mean over it of the summed RGB, each in [0, 1],
# is at least this (3 x 0.99): the bundle pads crops with 255 and JPEG keeps padding within ~1 %.
WHITE_THRESHOLD = 3 * 0.99


def decode_image(data: Any, rgb: bool = True) -> np.ndarray | None:
    """Encoded bytes -> (H, W, 3) uint8, RGB (or BGR with `rgb=False`, as YOLO takes it); grey and alpha images
    become 3-channel. None when the bytes are empty or do not decode, so callers count their own drop reason."""
    import cv2

    if data is None or len(data) == 0:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img  # cvtColor: faster than a flip and a copy


def white_padding_mask(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool foreground: the rectangle between the first and last row and column
    that are not white padding (WHITE_THRESHOLD). An all-white image gets an all-True mask: an empty mask
    would leave the model no tokens at all."""
    summed = (image.astype(np.float32) / 255.0).sum(axis=2)  # the order of operations the training data saw
    rows = summed.mean(axis=1) < WHITE_THRESHOLD
    cols = summed.mean(axis=0) < WHITE_THRESHOLD
    mask = np.zeros(image.shape[:2], dtype=bool)
    if not rows.any() or not cols.any():
        mask[:] = True
        return mask
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    mask[r[0] : r[-1] + 1, c[0] : c[-1] + 1] = True
    return mask
