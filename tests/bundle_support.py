"""A small synthetic build (persons, faces, clean) for the bundle tests, built through the stages' schemas.

Crops are drawn (a body and a head on a coloured background), so no third-party photo is needed; features
are an identity direction plus noise, so identity centers behave like real ones. Keypoint confidences vary
per image so that some identities qualify for the WebBody-test rule with small thresholds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir, format_shard_id
from schemas.clean import CLEAN
from schemas.faces import FACES
from schemas.persons import check_persons

DIM = 128


def identity_direction(ident: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(1000 + ident).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _crop(rng: np.random.Generator, ident: int, w: int, h: int) -> tuple[bytes, list[float], list[float]]:
    img = np.full((h, w, 3), rng.integers(150, 230), np.uint8)
    colour = tuple(int(c) for c in np.random.default_rng(ident).integers(20, 200, 3))
    cv2.ellipse(img, (w // 2, int(h * 0.6)), (w // 3, int(h * 0.35)), 0, 0, 360, colour, -1)
    head = (w // 2, int(h * 0.15))
    r = max(4, min(w, h) // 8)
    cv2.circle(img, head, r, (200, 170, 140), -1)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    face_box = [head[0] - r, head[1] - r, head[0] + r, head[1] + r]
    lm = [head[0] - r / 3, head[1] - r / 4, head[0] + r / 3, head[1] - r / 4, head[0], head[1],
          head[0] - r / 3, head[1] + r / 3, head[0] + r / 3, head[1] + r / 3]
    return buf.tobytes(), [float(v) for v in face_box], [float(v) for v in lm]


def _keypoints(rng: np.random.Generator, w: int, h: int, hard: bool) -> list[float]:
    kps = []
    for i in range(17):
        x, y = float(rng.uniform(0.1, 0.9) * w), float((0.1 + 0.05 * i) * h)
        if i < 5:
            conf = 0.2 if (hard and i in (3, 4)) else 0.9  # hard: ears hidden -> partial face
        elif i >= 10:
            conf = 0.9 if hard else 0.1  # hard: lower body visible
        else:
            conf = 0.8
        kps += [x, y, conf]
    return kps


def make_build(root: Path, n_ids: int = 8, per_id: int = 6, n_shards: int = 3, seed: int = 0,
               names: dict[int, str] | None = None, dropped: int = 3) -> dict[str, Path]:
    """Write persons/, faces/, clean/ under `root`; returns the inputs dict of the bundle stage."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[dict, dict, dict]]] = {}
    n = 0
    for ident in range(n_ids):
        for j in range(per_id + (1 if ident < dropped else 0)):
            sid = format_shard_id(n % n_shards)
            n += 1
            url = f"http://127.0.0.1:1/img/{ident}/{j}.jpg"
            sample_id = hashlib.sha256(url.encode()).hexdigest()[:16]
            det = int(j % 2)
            pid = f"{sample_id}_{det}"
            w, h = int(rng.integers(60, 220)), int(rng.integers(140, 420))
            crop, face_box, lm = _crop(rng, ident, w, h)
            name = (names or {}).get(ident, f"Person {ident}")
            person = {
                "person_id": pid, "sample_id": sample_id, "detection_index": det, "source_label": f"L{ident}",
                "name": name, "url": url, "image_sha256": hashlib.sha256(crop).hexdigest(),
                "box": [10.0, 20.0, 10.0 + w, 20.0 + h], "det_box": [12.0, 22.0, 8.0 + w, 18.0 + h],
                "box_score": float(rng.uniform(0.7, 1.0)), "keypoints": _keypoints(rng, w, h, j % 3 != 0),
                "crop": crop, "crop_format": "jpg", "crop_x": 10, "crop_y": 20, "crop_width": w,
                "crop_height": h, "image_width": 640, "image_height": 640,
            }
            person["keypoints_crop"] = list(person["keypoints"])
            feat = identity_direction(ident) * 10 + rng.normal(scale=0.3, size=DIM).astype(np.float32)
            face = {
                "person_id": pid, "sample_id": sample_id, "detection_index": det, "source_label": f"L{ident}",
                "name": name, "face_box": face_box, "face_landmarks": lm, "face_score": 0.99,
                "face_size_px": face_box[2] - face_box[0], "feature": feat.astype("<f2").tobytes(),
                "feature_dim": DIM, "feature_norm": float(np.linalg.norm(feat)), "embedder": "dlib",
            }
            kept = j < per_id
            clean = {
                "person_id": pid, "sample_id": sample_id, "detection_index": det, "source_label": f"L{ident}",
                "name": name, "identity": f"id{ident:04d}" if kept else None, "kept": kept,
                "reason": None if kept else "near_duplicate",
            }
            rows.setdefault(sid, []).append((person, face, clean))
    dirs = {k: root / k for k in ("persons", "faces", "clean")}
    for sid, items in sorted(rows.items()):
        st = {"rows_in": len(items), "rows_out": len(items), "drops": {}}
        DatasetDir(dirs["persons"]).commit_shard(sid, check_persons(_table([p for p, _, _ in items], "persons")), st)
        DatasetDir(dirs["faces"]).commit_shard(sid, FACES.from_rows([f for _, f, _ in items]), st)
        DatasetDir(dirs["clean"]).commit_shard(sid, CLEAN.from_rows([c for _, _, c in items]), st)
    return dirs


def _table(rows: list[dict], name: str):
    from schemas.persons import PERSONS

    return PERSONS.from_rows(rows)


def small_config(**bundle: object) -> BuildConfig:
    """A config for a tiny build: a local executor and test thresholds any synthetic identity can meet."""
    base = {"test_identities": 2, "samples_per_shard": 10, "test_min_hard": 0, "test_max_hard": 100,
            "test_min_images": 2, "test_max_images": 100, "write_face_npy": True}
    base.update(bundle)
    return BuildConfig.model_validate({"run": {"executor": "local"}, "bundle": base})
