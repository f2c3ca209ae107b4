"""Box padding, crops with a constant fill, and point transforms between image, crop and canvas pixels.

Conventions (shared by persons and bundle): coordinates are continuous pixel coordinates, pixel (i, j) covers
[i, i+1) x [j, j+1), as Ultralytics reports them. Boxes are `[x1, y1, x2, y2]`. Keypoints are `(K, 3)` rows of
`[x, y, conf]`; transforms move `x, y` and never touch `conf`, because visibility is an explicit value, not a
magic coordinate (the official code marked invisible points by a 0 coordinate and lost visible ones with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def pad_box(box: np.ndarray | list[float], frac: float) -> np.ndarray:
    """Grow a box by `frac` of its width on the left and the right, and of its height on top and bottom.

    Not clipped: a padded box may leave the image, and the crop fills that area (the official recipe pads 5%).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)} has negative width or height")
    dx, dy = (x2 - x1) * frac, (y2 - y1) * frac
    return np.array([x1 - dx, y1 - dy, x2 + dx, y2 + dy], dtype=np.float64)


def clip_box(box: np.ndarray | list[float], width: int, height: int) -> np.ndarray:
    """The part of a box inside a `width` x `height` image (may have zero area)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return np.array([x1, y1, max(x1, x2), max(y1, y2)], dtype=np.float64)


def crop_window(box: np.ndarray | list[float]) -> tuple[int, int, int, int]:
    """Integer pixel window `(x0, y0, x1, y1)` (end-exclusive) that covers the whole box, at least 1x1 pixel.

    Floor the near edge and ceil the far edge, so no part of the box is cut (the official code truncated both).
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x0, y0 = math.floor(x1), math.floor(y1)
    xe, ye = max(math.ceil(x2), x0 + 1), max(math.ceil(y2), y0 + 1)
    return x0, y0, xe, ye


def crop_with_fill(image: np.ndarray, window: tuple[int, int, int, int], fill: int | tuple[int, ...] = 255
                   ) -> np.ndarray:
    """Cut `window` out of an `(H, W[, C])` image; the part outside the image is a constant `fill`.

    White by default, the colour of the download's border padding, so a crop has one padding colour.
    """
    x0, y0, x1, y1 = window
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop window {window}")
    h, w = image.shape[:2]
    out = np.empty((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    out[...] = fill
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


@dataclass(frozen=True)
class Transform:
    """An axis-aligned map `p' = p * scale + offset` between two pixel frames (crop, resize, letterbox)."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    @staticmethod
    def crop(window: tuple[int, int, int, int]) -> Transform:
        """Image -> crop pixels for a crop whose top-left corner is at `window[:2]`."""
        return Transform(1.0, 1.0, -float(window[0]), -float(window[1]))

    def then(self, other: Transform) -> Transform:
        """First this transform, then `other`."""
        return Transform(
            self.scale_x * other.scale_x,
            self.scale_y * other.scale_y,
            self.offset_x * other.scale_x + other.offset_x,
            self.offset_y * other.scale_y + other.offset_y,
        )

    def inverse(self) -> Transform:
        if self.scale_x == 0 or self.scale_y == 0:
            raise ValueError("transform with zero scale has no inverse")
        return Transform(1 / self.scale_x, 1 / self.scale_y, -self.offset_x / self.scale_x,
                         -self.offset_y / self.scale_y)

    def points(self, pts: np.ndarray) -> np.ndarray:
        """Map `(..., >=2)` points; columns after x, y (confidence) are copied unchanged."""
        arr = np.asarray(pts, dtype=np.float64)
        out = arr.copy()
        out[..., 0] = arr[..., 0] * self.scale_x + self.offset_x
        out[..., 1] = arr[..., 1] * self.scale_y + self.offset_y
        return out

    def box(self, box: np.ndarray | list[float]) -> np.ndarray:
        b = np.asarray(box, dtype=np.float64).reshape(2, 2)
        return self.points(b).reshape(4)


@dataclass(frozen=True)
class Letterbox(Transform):
    """The letterbox of a `new_w` x `new_h` resize pasted at (offset_x, offset_y): points map by the exact
    scale (size / long side), the pasted pixels cover `content_box`."""

    new_w: int = 0
    new_h: int = 0

    def map_xy(self, x: float, y: float) -> tuple[float, float]:
        return x * self.scale_x + self.offset_x, y * self.scale_y + self.offset_y

    @property
    def content_box(self) -> list[float]:
        return [self.offset_x, self.offset_y, self.offset_x + self.new_w, self.offset_y + self.new_h]


def letterbox_geometry(w: int, h: int, size: int) -> Letterbox:
    """Where a `w` x `h` image goes on a `size` x `size` canvas: long side scaled to `size`, centred."""
    if w <= 0 or h <= 0:
        raise ValueError(f"bad source size {w}x{h}")
    scale = size / max(w, h)
    # round (not truncate) so a 383.9999 side does not lose a pixel column; never 0 for thin crops
    new_w = max(1, min(size, int(round(w * scale))))
    new_h = max(1, min(size, int(round(h * scale))))
    return Letterbox(scale, scale, float((size - new_w) // 2), float((size - new_h) // 2), new_w, new_h)


def letterbox_image(image: np.ndarray, size: int, fill: int = 255) -> tuple[np.ndarray, Letterbox]:
    """Resize so the long side is `size`, centre on a `size` x `size` canvas of `fill`; return both. The one
    letterbox of the pipeline (the bundle's 384 white canvas, test inputs of the model stages).

    The paste offset is whole pixels; points map by the exact scale, so they are within half a pixel of the
    pasted pixels' edges (`content_box`)."""
    import cv2

    h, w = image.shape[:2]
    geo = letterbox_geometry(w, h, size)
    # INTER_AREA when shrinking (no aliasing), bilinear when enlarging small crops.
    interp = cv2.INTER_AREA if geo.scale_x < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (geo.new_w, geo.new_h), interpolation=interp)
    canvas = np.empty((size, size) + image.shape[2:], dtype=image.dtype)
    canvas[...] = fill
    top, left = int(geo.offset_y), int(geo.offset_x)
    canvas[top : top + geo.new_h, left : left + geo.new_w] = resized
    return canvas, geo
