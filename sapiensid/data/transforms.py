"""Per-sample image/keypoint transforms for SapiensID: the 22-point layout, white-padding foreground masks,
training augmentation and evaluation preprocessing. Everything works on one uint8 RGB image in numpy so it can
run in data-loader workers.

22-point layout (model input, coordinates in [0, 1] of the model image, -1 = missing):
0..16 COCO body keypoints from the pose model, 17 left eye, 18 right eye, 19 nose, 20 left mouth, 21 right mouth
(the face landmarks, ArcFace order in the shard is L-eye, R-eye, nose, L-mouth, R-mouth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from schemas.imaging import white_padding_mask
from schemas.sample import IMAGE_SIZE, KEYPOINT_VISIBLE

NUM_KEYPOINTS = 22
# Anatomical left/right pairs: a horizontal flip must swap them so "left" still means the person's left.
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18), (20, 21))
FLIP_INDEX = np.arange(NUM_KEYPOINTS)
for _a, _b in FLIP_PAIRS:
    FLIP_INDEX[_a], FLIP_INDEX[_b] = _b, _a



def keypoints22_from_meta(meta: dict[str, Any], frame: int = IMAGE_SIZE) -> np.ndarray:
    """(22, 2) pixel coordinates in the shard's 384 frame from a sample record; -1 where missing/invisible."""
    out = np.full((NUM_KEYPOINTS, 2), -1.0, dtype=np.float32)
    kps = np.asarray(meta["keypoints"], dtype=np.float32).reshape(17, 3)
    vis = kps[:, 2] >= KEYPOINT_VISIBLE
    out[:17][vis] = kps[vis, :2]
    lm = meta.get("face_landmarks")
    if lm is not None:
        out[17:] = np.asarray(lm, dtype=np.float32).reshape(5, 2)
    # Points outside the frame carry no usable position.
    bad = (out < 0).any(axis=1) | (out > frame).any(axis=1)
    out[bad] = -1.0
    return out


def foreground_mask_white(image: np.ndarray) -> np.ndarray:
    """(H, W) bool foreground by the white-padding rule (schemas.imaging, shared with the pipeline)."""
    return white_padding_mask(image)


def _apply_affine(points: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Map valid pixel points through a 2x3 affine; points leaving the output square become -1."""
    out = np.full_like(points, -1.0)
    valid = (points >= 0).all(axis=1)
    if valid.any():
        p = points[valid] @ matrix[:, :2].T + matrix[:, 2]
        inside = (p >= 0).all(axis=1) & (p <= size).all(axis=1)
        idx = np.flatnonzero(valid)[inside]
        out[idx] = p[inside]
    return out


def normalise_keypoints(points: np.ndarray, size: int) -> np.ndarray:
    """Pixel coordinates -> [0, 1], keeping -1 for missing points."""
    out = points / float(size)
    out[(points < 0).any(axis=1)] = -1.0
    return out.astype(np.float32)


def hflip_sample(image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an image and its pixel keypoints, swapping left/right indices."""
    w = image.shape[1]
    flipped = np.ascontiguousarray(image[:, ::-1])
    pts = points[FLIP_INDEX].copy()
    valid = (pts >= 0).all(axis=1)
    pts[valid, 0] = w - pts[valid, 0]
    return flipped, pts


def square_pad_resize(image: np.ndarray, points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre the image on a white square (extra pixel right/bottom) and resize to `size`: eval preprocessing.

    Pad then `cv2.resize` (area filter when shrinking): pixel-centre aligned, so a mirrored input gives exactly
    the mirrored output (flip TTA relies on it). Points are pixel-edge coordinates (0..w)."""
    h, w = image.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    if side != h or side != w:
        image = cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left, cv2.BORDER_CONSTANT,
                                   value=(255, 255, 255))
    scale = size / side
    if side != size:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interp)
    matrix = np.array([[scale, 0.0, left * scale], [0.0, scale, top * scale]], dtype=np.float64)
    return np.ascontiguousarray(image), _apply_affine(points, matrix, size)


@dataclass
class AugmentConfig:
    """Training augmentation (the official training recipe is not published; these follow CVLface's spirit)."""

    scale: tuple[float, float] = (0.8, 1.1)  # zoom of the body relative to the canvas
    shift: float = 0.08  # max translation as a share of the output side
    rotate_prob: float = 0.2
    rotate_deg: float = 15.0
    flip_prob: float = 0.5
    color_prob: float = 0.8
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    crop_prob: float = 0.2  # keep only the top part of the body (partial views are common on the web)
    crop_keep: tuple[float, float] = (0.45, 0.9)
    blur_prob: float = 0.1


def _content_box(meta: dict[str, Any] | None, image: np.ndarray) -> tuple[int, int, int, int]:
    if meta is not None and meta.get("content_box") is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in meta["content_box"])
    else:
        ys, xs = np.nonzero(foreground_mask_white(image))
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    h, w = image.shape[:2]
    return max(0, x1), max(0, y1), min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))


def _color_jitter(region: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    x = region.astype(np.float32)
    b = 1.0 + rng.uniform(-cfg.brightness, cfg.brightness)
    c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    s = 1.0 + rng.uniform(-cfg.saturation, cfg.saturation)
    x = x * b
    mean = x.mean()
    x = (x - mean) * c + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * s + grey
    # Keep the body off pure white so the foreground rule still finds it.
    return np.clip(x, 0, 250).astype(np.uint8)


def augment(
    image: np.ndarray,
    points: np.ndarray,
    size: int,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    meta: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random photometric jitter inside the body area, partial crop, zoom/shift/rotate onto a white `size`
    canvas and horizontal flip. `points` are pixels of `image`; the result's points are pixels of the output."""
    img = image.copy()
    pts = points.copy()
    x1, y1, x2, y2 = _content_box(meta, img)
    if rng.random() < cfg.color_prob:
        img[y1:y2, x1:x2] = _color_jitter(img[y1:y2, x1:x2], cfg, rng)
    if rng.random() < cfg.crop_prob:
        cut = y1 + int(round((y2 - y1) * rng.uniform(*cfg.crop_keep)))
        img[cut:] = 255
        pts[pts[:, 1] >= cut] = -1.0
        y2 = max(y1 + 1, cut)
    if rng.random() < cfg.blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.5))
    h, w = img.shape[:2]
    # Similarity transform: centre the content box, zoom so its long side spans `zoom` of the canvas.
    zoom = rng.uniform(*cfg.scale) * size / max(x2 - x1, y2 - y1, 1)
    zoom = min(zoom, size / max(h, w) * 2.0)  # never blow tiny content up beyond 2x the plain resize
    if zoom < 0.75:
        # Shrink with the area filter first (as evaluation does): a strided affine would alias.
        nw, nh = max(1, int(round(w * zoom))), max(1, int(round(h * zoom)))
        fx, fy = nw / w, nh / h
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        valid = (pts >= 0).all(axis=1)
        pts[valid] *= np.array([fx, fy], dtype=pts.dtype)
        x1, x2, y1, y2 = x1 * fx, x2 * fx, y1 * fy, y2 * fy
        zoom = zoom / fx
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if rng.random() < cfg.rotate_prob else 0.0
    tx, ty = rng.uniform(-cfg.shift, cfg.shift, size=2) * size
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
    matrix[:, 2] += np.array([size / 2.0 + tx - cx, size / 2.0 + ty - cy])
    out = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
    pts = _apply_affine(pts, matrix, size)
    if rng.random() < cfg.flip_prob:
        out, pts = hflip_sample(out, pts)
    return out, pts


def resize_square(image: np.ndarray, points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eval path for a shard image (already square and white padded): plain resize."""
    if image.shape[0] == image.shape[1] == size:
        return image, points
    return square_pad_resize(image, points, size)
