"""Geometry of the faces stage: the official upper-body pre-crop, square padding, 5-point alignment.

All coordinates are pixels of the body crop unless said otherwise. The pre-crop follows the official
`crop_upper_body_from_body` (docs/official-pipeline.md 1d), including its integer truncations and fall-backs; one
case the official code would crash on (a crop with no area after the shoulder cut) falls back to the whole
body crop too.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import SimilarityTransform

# ArcFace 112x112 template, ArcFace order: image-left eye, image-right eye, nose, left and right mouth corner.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

NOSE, L_EYE, R_EYE, L_EAR, R_EAR, L_SHOULDER, R_SHOULDER = range(7)


class AlignError(ValueError):
    """The landmarks do not define a usable similarity transform."""


def visible_mask(keypoints: np.ndarray, min_conf: float) -> np.ndarray:
    """(17,) bool: keypoint confidence >= min_conf and finite coordinates (YOLO's visibility rule)."""
    kp = np.asarray(keypoints, dtype=np.float64).reshape(17, 3)
    return np.isfinite(kp).all(1) & (kp[:, 2] >= min_conf)


def upper_body_box(keypoints: np.ndarray, width: int, height: int, min_conf: float = 0.5,
                   margin: float = 0.5) -> tuple[int, int, int, int]:
    """Integer (x1, y1, x2, y2) of the face search region inside a `width` x `height` body crop.

    `keypoints`: (17, 3) or (51,) COCO x, y (body-crop px), confidence.
    """
    kp = np.asarray(keypoints, dtype=np.float64).reshape(17, 3)
    vis = visible_mask(kp, min_conf)
    whole = (0, 0, width, height)
    if not vis[5:17].any() or not vis[[L_SHOULDER, R_SHOULDER]].any():
        return whole
    upper = [i for i in range(7) if vis[i]]
    if len(upper) < 2:
        return whole
    # Clip to the crop, then truncate to integers as the official code does.
    xs = np.clip(kp[upper, 0], 0, width)
    ys = np.clip(kp[upper, 1], 0, height)
    min_x, max_x = int(xs.min()), int(xs.max())
    min_y, max_y = int(ys.min()), int(ys.max())
    if min_x == max_x or min_y == max_y:
        return whole
    bw, bh = max_x - min_x, max_y - min_y
    x1 = max(0, int(min_x - 0.75 * margin * bw))
    x2 = min(width, int(max_x + 0.75 * margin * bw))
    y1 = max(0, int(min_y - 3 * margin * bh))
    # Cut at the lowest visible shoulder (a shoulder is always visible here).
    y2 = int(max(ys[i] for i, k in enumerate(upper) if k in (L_SHOULDER, R_SHOULDER)))
    if vis[L_EAR] and vis[R_EAR]:
        ex1 = int(np.clip(kp[L_EAR, 0], 0, width))
        ex2 = int(np.clip(kp[R_EAR, 0], 0, width))
        ex1, ex2 = min(ex1, ex2), max(ex1, ex2)
        half = (ex2 - ex1) // 2
        x1, x2 = max(0, ex1 - half), min(width, ex2 + half)
    if x2 <= x1 or y2 <= y1:
        return whole
    return x1, y1, x2, y2


def pad_to_square(image: np.ndarray, value: int = 0) -> tuple[np.ndarray, int, int]:
    """Centre `image` on a square canvas (extra pixel right/bottom); returns (square, pad_left, pad_top)."""
    h, w = image.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    if side == w and side == h:
        return image, 0, 0
    canvas = np.full((side, side, 3), value, dtype=image.dtype)
    canvas[top:top + h, left:left + w] = image
    return canvas, left, top


def detector_canvas(image: np.ndarray, region: tuple[int, int, int, int], size: int,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official detector input: the pre-crop `region` centred on a black square, resized to `size`.

    Only the region is resized (not the black padding), straight into a `size` x `size` canvas. Returns the
    canvas and the map back to body-crop px: `body = canvas_px * scale + shift` (scale, shift: (2,) x, y).
    """
    import cv2

    x1, y1, x2, y2 = region
    cw, ch = x2 - x1, y2 - y1
    side = max(cw, ch)
    s = size / side
    rw, rh = max(1, min(size, round(cw * s))), max(1, min(size, round(ch * s)))
    px, py = round((side - cw) // 2 * s), round((side - ch) // 2 * s)
    px, py = min(px, size - rw), min(py, size - rh)
    crop = image[y1:y2, x1:x2]
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[py:py + rh, px:px + rw] = cv2.resize(crop, (rw, rh), interpolation=interp) if (rw, rh) != (cw, ch) \
        else crop
    scale = np.array([cw / rw, ch / rh], np.float64)
    shift = np.array([x1 - px * scale[0], y1 - py * scale[1]], np.float64)
    return canvas, scale, shift


def similarity_to_template(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) least-squares similarity (Umeyama, skimage) mapping the 5 landmarks onto the ArcFace template."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.isfinite(src).all():
        raise AlignError("non-finite landmarks")
    if np.ptp(src, axis=0).max() < 1e-3:
        raise AlignError("landmarks collapse to one point")
    dst = ARCFACE_112 * (size / 112.0)
    tform = SimilarityTransform.from_estimate(src, dst)
    if not tform:  # skimage returns a falsy FailedEstimation instead of raising
        raise AlignError(f"similarity estimation failed: {tform}")
    matrix = np.asarray(tform.params[:2], dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if not np.isfinite(matrix).all() or not (1e-4 < scale < 1e4):
        raise AlignError(f"degenerate similarity (scale {scale:g})")
    return matrix


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int = 112) -> np.ndarray:
    """The aligned `size` x `size` face (black outside the source), bilinear as the official grid_sample."""
    import cv2

    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))


def warp_region(image: np.ndarray, region: tuple[int, int, int, int], matrix: np.ndarray,
                size: int = 112) -> np.ndarray:
    """`warp_face` of the black-padded pre-crop, without building it: only `region` of `image` is sampled
    (black elsewhere), `matrix` maps body-crop px to the aligned face."""
    x1, y1 = region[0], region[1]
    local = matrix.copy()
    local[:, 2] = matrix[:, :2] @ np.array([x1, y1], np.float64) + matrix[:, 2]
    return warp_face(np.ascontiguousarray(image[region[1]:region[3], x1:region[2]]), local, size)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]
