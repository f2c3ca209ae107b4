"""Inputs for the faces stage tests: persons rows (schemas/persons.py) built from real photos."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from pipeline.assets import asset_path
from pipeline.shards import DatasetDir, format_shard_id
from schemas.persons import PERSONS

NO_KEYPOINTS = [0.0] * 51  # every point invisible: the pre-crop falls back to the whole body crop


def load_rgb(photo: str, width: int | None = None) -> np.ndarray:
    bgr = cv2.imread(str(asset_path(photo)), cv2.IMREAD_COLOR)
    assert bgr is not None, photo
    if width is not None:
        h, w = bgr.shape[:2]
        bgr = cv2.resize(bgr, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def encode_jpg(rgb: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def person_row(sample_id: str, crop: np.ndarray | None = None, keypoints: list[float] | None = None,
               crop_bytes: bytes | None = None, label: str | None = None, det: int = 0) -> dict:
    """A PERSONS row whose body crop is `crop` (RGB) or raw `crop_bytes` (e.g. undecodable)."""
    data = crop_bytes if crop_bytes is not None else encode_jpg(crop)
    h, w = (crop.shape[:2] if crop is not None else (100, 100))
    kp = list(keypoints if keypoints is not None else NO_KEYPOINTS)
    return {
        "person_id": f"{sample_id}_{det}", "sample_id": sample_id, "detection_index": det,
        "source_label": label or f"label_{sample_id}", "name": f"name {sample_id}",
        "url": f"http://127.0.0.1/{sample_id}.jpg", "image_sha256": hashlib.sha256(data).hexdigest(),
        "box": [0.0, 0.0, float(w), float(h)], "det_box": [0.0, 0.0, float(w), float(h)], "box_score": 0.9,
        "keypoints": kp, "keypoints_crop": kp, "crop": data, "crop_format": "jpg", "crop_x": 0, "crop_y": 0,
        "crop_width": w, "crop_height": h, "image_width": w, "image_height": h,
    }


def keypoints_from_face(landmarks: np.ndarray, box: np.ndarray, conf: float = 0.9) -> list[float]:
    """Plausible COCO keypoints of a frontal person from a face's 5 landmarks and box (body-crop px):
    nose, eyes, ears at the box sides, shoulders 1.3 face heights below the eyes."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    fh = y2 - y1
    k = np.zeros((17, 3))
    k[0, :2] = lm[2]
    k[1, :2], k[2, :2] = lm[0], lm[1]
    k[3, :2] = (x1, (lm[0, 1] + lm[2, 1]) / 2)
    k[4, :2] = (x2, (lm[1, 1] + lm[2, 1]) / 2)
    k[5, :2] = (x1 - 0.4 * (x2 - x1), lm[0, 1] + 1.3 * fh)
    k[6, :2] = (x2 + 0.4 * (x2 - x1), lm[1, 1] + 1.3 * fh)
    k[:7, 2] = conf
    return k.reshape(-1).tolist()


def write_persons(root, shards: list[list[dict]]) -> DatasetDir:
    d = DatasetDir(root)
    for i, rows in enumerate(shards):
        d.commit_shard(format_shard_id(i), PERSONS.from_rows(rows),
                       {"rows_in": len(rows), "rows_out": len(rows), "drops": {}})
    return d


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
