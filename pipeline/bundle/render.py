"""One bundle sample from a persons row (+ its faces row): the 384 image and its metadata record.

The body crop is resized so its long side is `size` (aspect kept) and pasted centred on a white square
(top/left = floor(pad / 2), as the official bundle step). Every coordinate (17 keypoints, face box, 5 face
landmarks) is mapped from body-crop pixels into that square with the same scale and offset.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np

from pipeline.geometry import Letterbox, letterbox_image
from schemas.imaging import decode_image
from schemas.sample import KEYPOINT_VISIBLE, NUM_BODY_KEYPOINTS, SAMPLE_VERSION


class RenderError(ValueError):
    """A row that cannot become a sample; `reason` is the counted drop reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_crop(data: bytes) -> np.ndarray:
    """Encoded crop bytes -> RGB uint8; RenderError('decode_error') if it does not decode."""
    rgb = decode_image(data)
    if rgb is None:
        raise RenderError("decode_error", "body crop does not decode")
    return rgb


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RenderError("encode_error", "JPEG encoding failed")
    return buf.tobytes()


def _r(v: float) -> float:
    # 3 decimals: sub-pixel precision is all a 384 image needs, and it keeps the JSON small and stable.
    return round(float(v), 3)


def map_keypoints(kps_crop: list[float], geo: Letterbox, size: int) -> tuple[list[list[float]], int]:
    """17 x [x, y, conf] crop px -> 384 frame. A 'visible' point that lands outside the frame is not visible
    in this image: its visibility is zeroed (returned count says how many). Returns (points, n_outside)."""
    if len(kps_crop) != NUM_BODY_KEYPOINTS * 3:
        raise RenderError("bad_keypoints", f"expected {NUM_BODY_KEYPOINTS * 3} keypoint values, got {len(kps_crop)}")
    out: list[list[float]] = []
    outside = 0
    for i in range(NUM_BODY_KEYPOINTS):
        x, y, v = (float(t) for t in kps_crop[3 * i : 3 * i + 3])
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(v)):
            raise RenderError("bad_keypoints", f"keypoint {i} is not finite")
        fx, fy = geo.map_xy(x, y)
        v = min(1.0, max(0.0, v))
        if v >= KEYPOINT_VISIBLE and not (0.0 <= fx <= size and 0.0 <= fy <= size):
            v = 0.0
            outside += 1
        out.append([_r(fx), _r(fy), _r(v)])
    return out, outside


def visible_mask(points: list[list[float]]) -> int:
    mask = 0
    for i, (_, _, v) in enumerate(points):
        if v >= KEYPOINT_VISIBLE:
            mask |= 1 << i
    return mask


def face_npy(feature: bytes, dim: int) -> bytes:
    """The stored float16 feature as a `.npy` file (np.save writes no timestamp: deterministic bytes)."""
    arr = np.frombuffer(feature, dtype="<f2")
    if arr.size != dim:
        raise RenderError("bad_feature", f"feature has {arr.size} values, feature_dim says {dim}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def render_sample(person: dict[str, Any], face: dict[str, Any] | None, plan: dict[str, Any], size: int,
                  quality: int, pipeline_version: str, cfg_hash: str) -> tuple[bytes, dict[str, Any], int]:
    """Returns (jpg bytes, metadata record, keypoints moved out of frame)."""
    rgb = decode_crop(person["crop"])
    canvas, geo = letterbox_image(rgb, size, fill=255)
    jpg = encode_jpeg(canvas, quality)
    kps, outside = map_keypoints(list(person["keypoints_crop"]), geo, size)
    face_box = landmarks = None
    face_score = None
    if face is not None:
        fb = [float(v) for v in face["face_box"]]
        x1, y1 = geo.map_xy(fb[0], fb[1])
        x2, y2 = geo.map_xy(fb[2], fb[3])
        # A detector box may reach past the body crop's edge (the face sits at the crop border): the record
        # stores it clipped to the frame, which is what a reader can use.
        x1, x2 = sorted((min(max(x1, 0.0), size), min(max(x2, 0.0), size)))
        y1, y2 = sorted((min(max(y1, 0.0), size), min(max(y2, 0.0), size)))
        face_box = [_r(x1), _r(y1), _r(x2), _r(y2)]
        lm = [float(v) for v in face["face_landmarks"]]
        landmarks = [[_r(c) for c in geo.map_xy(lm[2 * i], lm[2 * i + 1])] for i in range(5)]
        face_score = _r(face["face_score"])
    meta: dict[str, Any] = {
        "key": plan["key"],
        "class_id": int(plan["class_id"]),
        "identity": plan["identity"],
        "name": person["name"],
        "split": plan["split"],
        "url": person["url"],
        "image_sha256": person.get("image_sha256") or "",
        "sample_id": person["sample_id"],
        "detection_index": int(person["detection_index"]),
        "keypoints": kps,
        "body_box": [_r(v) for v in person["box"]],
        "content_box": geo.content_box,
        "person_score": _r(person["box_score"]),
        "face_box": face_box,
        "face_landmarks": landmarks,
        "face_score": face_score,
        "crop_size": [int(rgb.shape[1]), int(rgb.shape[0])],
        "role": plan.get("role"),
        # one comma-separated string, never a list: a list that is empty in the first records makes readers
        # that infer one type per field (HF datasets) type it as list<null> and fail on later records
        "subsets": ",".join(plan.get("subsets") or []),
        "pipeline_version": pipeline_version,
        "config_hash": cfg_hash,
        "version": SAMPLE_VERSION,
    }
    return jpg, meta, outside
