"""The faces stage: body crops (persons table) -> best face box, 5 landmarks, score and a face feature.

Per person row, as in the official step d/e (docs/official-pipeline.md 1d, 1e):
1. decode the body crop; pre-crop the upper body from the 17 keypoints (official rule and fall-backs);
2. pad it to a square with black, resize to the detector input (160 by default), detect; keep the single best
   face whatever its score (the score is stored; cleaning filters it);
3. official minimum size: 2 * max(face w, h) in pre-crop pixels >= `min_face_size` (16), else `face_too_small`;
4. similarity-align the 5 landmarks to the ArcFace 112 template (skimage), warp, embed (batched per call);
5. store box and landmarks in body-crop pixels, the raw feature as float16 with its float32 norm.
Drops: decode_error, bad_keypoints, no_face, face_too_small, align_failed, embed_failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from pipeline.config import FacesConfig, hashed_dump
from pipeline.faces.align import (
    AlignError,
    detector_canvas,
    similarity_to_template,
    transform_points,
    upper_body_box,
    warp_region,
)
from pipeline.faces.detectors import Detector, detector_entry
from pipeline.faces.embedders import Embedder, FaceCrop, embedder_entry
from pipeline.inference import choose_backend
from pipeline.stage import BatchResult, ShardStage, StageError, config_hash
from pipeline.weights import resolve_weights
from schemas.faces import FACES
from schemas.imaging import decode_image
from schemas.persons import PERSONS

log = logging.getLogger(__name__)

# Columns of the persons table this stage reads (its schema module may carry more).
# Left out of the output's config hash: they change speed, not rows (GPU numerics aside).
INPUT_COLUMNS = ("person_id", "sample_id", "detection_index", "source_label", "name", "crop", "keypoints_crop")


@dataclass
class _Prepared:
    """One input row after decoding and pre-cropping, waiting for detection."""

    row: dict
    image: np.ndarray  # body crop, RGB uint8
    region: tuple[int, int, int, int]  # upper-body pre-crop, body-crop px
    canvas: np.ndarray  # detector input: the pre-crop centred on black, resized to the detector's size
    scale: np.ndarray  # (2,) body px per canvas px
    shift: np.ndarray  # (2,) body px of canvas (0, 0)


class FacesStage(ShardStage):
    name: ClassVar[str] = "faces"
    input_schema = PERSONS
    output_schema = FACES
    sort_keys = ("person_id",)
    uses_model = True

    def __init__(self, config: FacesConfig | None = None):
        super().__init__(config or FacesConfig())
        self.detector: Detector | None = None
        self.embedder: Embedder | None = None

    def config_hash(self) -> str:
        # Execution settings do not change the rows (features are batch-independent, see the tests). The
        # backend that will run (auto resolved) does, in the last bits: it is in the hash.
        doc = hashed_dump(self.config)  # without the fields marked execution() in pipeline/config.py
        doc["backend"] = self.backend_name()
        return config_hash(doc)

    def backend_name(self) -> str:
        """The configured backend, 'auto' resolved (pipeline.inference.choose_backend)."""
        from pipeline.runtime import has_gpu

        cfg: FacesConfig = self.config
        return choose_backend(cfg.backend, gpu=cfg.device != "cpu" and has_gpu())

    def detector_backend(self) -> str:
        # The detector is an ONNX file: its own runtime serves 'torch' too.
        return "openvino" if self.backend_name() == "openvino" else "onnxruntime"

    # -- models ---------------------------------------------------------------------------------------
    def resolve_paths(self) -> tuple[Path | None, Path | None, dict[str, Path]]:
        """Local paths of the detector, the embedder and its extra weight files (by config field), or
        StageError: an unknown detector or embedder, or a missing file, fails here, on the driver, before any worker starts."""
        cfg: FacesConfig = self.config
        det_name = cfg.detector_model or detector_entry(cfg.detector).default_weights
        det = resolve_weights(det_name, f"{cfg.detector} detector") if det_name else None
        entry = embedder_entry(cfg.embedder)
        extras = {f: resolve_weights(getattr(cfg, f), f"{cfg.embedder} embedder's {f}") for f in entry.extra_weights}
        return det, self._embedder_weights(), extras

    def setup(self) -> None:
        cfg: FacesConfig = self.config
        det_path, emb_path, extras = self.resolve_paths()
        self.detector = detector_entry(cfg.detector).factory(cfg, det_path, self.detector_backend())
        self.embedder = embedder_entry(cfg.embedder).factory(cfg, emb_path, extras, self.backend_name())

    def _embedder_weights(self) -> Path | None:
        cfg: FacesConfig = self.config
        entry = embedder_entry(cfg.embedder)
        name = cfg.embedder_model or entry.default_weights
        if name is None:  # an embedder without weight files (its factory refuses None if it needs one)
            return None
        if name == "random":
            if not entry.random_weights:
                raise StageError(f"faces.embedder_model 'random' is not allowed for the {cfg.embedder} embedder "
                                 "(tests and benchmarks of kprpe only)")
            log.warning("faces: %s with RANDOM weights: features are meaningless (tests/benchmarks only)",
                        cfg.embedder)
            return None
        return resolve_weights(name, f"{cfg.embedder} face embedder")

    # -- per batch --------------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> BatchResult:
        missing = [c for c in INPUT_COLUMNS if c not in batch.column_names]
        if missing:
            raise StageError(f"faces: input lacks column(s) {missing}: point --input at the persons stage output")
        if self.detector is None or self.embedder is None:
            self.ensure_setup()
        cfg: FacesConfig = self.config
        drops: Counter = Counter()
        prepared: list[_Prepared] = []
        for row in batch.select(list(INPUT_COLUMNS)).to_pylist():
            item = self._prepare(row, drops)
            if item is not None:
                prepared.append(item)
        detections = self.detector.detect_batch([p.canvas for p in prepared], max_faces=1,
                                                score_threshold=cfg.min_detector_score)
        faces: list[FaceCrop] = []
        records: list[dict] = []
        for item, dets in zip(prepared, detections):
            if not dets:
                drops["no_face"] += 1
                continue
            det = dets[0]
            box = (det.box.reshape(2, 2) * item.scale + item.shift).reshape(4)
            landmarks = det.landmarks * item.scale + item.shift
            size = float(np.max(box[2:] - box[:2]))
            # Official: int(2 * max side) of the box in pre-crop px (the square is at body-crop scale) >= 16.
            if int(2 * size) < cfg.min_face_size:
                drops["face_too_small"] += 1
                continue
            try:
                matrix = similarity_to_template(landmarks)
            except AlignError as exc:
                log.debug("faces: %s align failed: %s", item.row["person_id"], exc)
                drops["align_failed"] += 1
                continue
            # Sampled from the pre-crop only (black elsewhere), as the official warp of the padded square.
            aligned = warp_region(item.image, item.region, matrix)
            faces.append(FaceCrop(aligned, transform_points(landmarks, matrix), item.image, box))
            records.append({
                "person_id": item.row["person_id"], "sample_id": item.row["sample_id"],
                "detection_index": item.row["detection_index"], "source_label": item.row["source_label"],
                "name": item.row["name"], "face_box": box.tolist(),
                "face_landmarks": landmarks.reshape(10).tolist(),
                "face_score": det.score, "face_size_px": size,
            })
        rows = self._embed(faces, records, drops)
        return BatchResult(FACES.from_rows(rows), drops)

    def _prepare(self, row: dict, drops: Counter) -> _Prepared | None:
        cfg: FacesConfig = self.config
        image = decode_rgb(row["crop"])
        if image is None:
            drops["decode_error"] += 1
            return None
        kps = row["keypoints_crop"]
        if kps is None or len(kps) != 51:
            drops["bad_keypoints"] += 1
            return None
        h, w = image.shape[:2]
        region = upper_body_box(np.asarray(kps, np.float64), w, h, cfg.keypoint_conf, cfg.upper_body_margin)
        canvas, scale, shift = detector_canvas(image, region, self.detector.input_size)
        return _Prepared(row, image, region, canvas, scale, shift)

    def _embed(self, faces: list[FaceCrop], records: list[dict], drops: Counter) -> list[dict]:
        if not faces:
            return []
        try:
            feats = self.embedder.embed(faces)
        except StageError:
            raise
        except Exception:  # noqa: BLE001 - isolate the face that breaks the embedder, keep the others
            log.exception("faces: batch embedding failed, retrying face by face")
            feats = np.full((len(faces), self.embedder.dim), np.nan, np.float32)
            for i, face in enumerate(faces):
                try:
                    feats[i] = self.embedder.embed([face])[0]
                except Exception:  # noqa: BLE001
                    log.exception("faces: %s embedding failed", records[i]["person_id"])
        out = []
        for rec, feat in zip(records, feats):
            feat = np.asarray(feat, np.float32)
            # Stored as float16: a value beyond its range (65504) would silently become inf.
            if not np.isfinite(feat.astype(np.float16)).all():
                drops["embed_failed"] += 1
                continue
            rec.update(feature_columns(feat, self.embedder.name))
            out.append(rec)
        return out


def decode_rgb(data: Any) -> np.ndarray | None:
    """Encoded image bytes -> RGB uint8, None if undecodable (schemas.imaging, the one decoder)."""
    return decode_image(data)


def feature_columns(feature: np.ndarray, embedder: str) -> dict:
    """Storage form of a raw feature: float16 little-endian bytes, its dimension and float32 norm."""
    f = np.asarray(feature, np.float32).reshape(-1)
    return {"feature": f.astype("<f2").tobytes(), "feature_dim": int(f.size),
            "feature_norm": float(np.linalg.norm(f)), "embedder": embedder}


def decode_feature(data: bytes, dim: int) -> np.ndarray:
    """Inverse of `feature_columns`: float16 bytes -> float32 vector."""
    arr = np.frombuffer(data, dtype="<f2")
    if arr.size != dim:
        raise ValueError(f"feature has {arr.size} values, expected {dim}")
    return arr.astype(np.float32)
