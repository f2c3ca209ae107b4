"""Face detectors (box + 5 landmarks + score) run through ONNX Runtime or OpenVINO (on the same ONNX file).

Two output layouts are decoded, chosen from the model's outputs (or forced in config):

- "biubug6": the RetinaFace of github biubug6/Pytorch_Retinaface (and the official pipeline's private R50):
  outputs `loc (B,P,4)`, `conf (B,P,2)` (softmaxed), `landmarks (B,P,10)` over SSD priors on strides 8/16/32
  with min sizes (16,32)/(64,128)/(256,512) and variances (0.1, 0.2); input BGR minus (104, 117, 123).
- "insightface": insightface's RetinaFace/SCRFD export: per stride `score_s`, `bbox_s` (distances to the
  anchor centre, in stride units) and optionally `kps_s` (offsets, stride units); input RGB (x - 127.5)/128.
  Outputs are matched by name when they carry the `score_8` style names, else by insightface's order
  (all scores, then all boxes, then all keypoints).

Every image is letterboxed at the top-left corner of a black square canvas of the detector's input size (a
fixed-size model's own, else the requested one), so one batched call serves a whole batch of crops; boxes
and landmarks come back in the caller's pixel coordinates.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import cv2
import numpy as np

from pipeline.registry import Registry
from pipeline.stage import StageError

if TYPE_CHECKING:
    from pipeline.config import FacesConfig

Layout = Literal["auto", "biubug6", "insightface"]

_BIUBUG6_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
_BIUBUG6_STEPS = (8, 16, 32)
_BIUBUG6_VARIANCES = (0.1, 0.2)
_BIUBUG6_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)


@dataclass(frozen=True)
class Detection:
    box: np.ndarray  # (4,) x1, y1, x2, y2 in the input image's pixels
    landmarks: np.ndarray  # (5, 2) x, y in the input image's pixels
    score: float


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def biubug6_priors(height: int, width: int) -> np.ndarray:
    """(P, 4) priors cx, cy, w, h normalised by the input size, in the network's output order."""
    parts = []
    for step, sizes in zip(_BIUBUG6_STEPS, _BIUBUG6_MIN_SIZES):
        fh, fw = int(np.ceil(height / step)), int(np.ceil(width / step))
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = ((xs + 0.5) * step / width).reshape(-1, 1)
        cy = ((ys + 0.5) * step / height).reshape(-1, 1)
        per = []
        for s in sizes:  # min sizes vary fastest
            per.append(np.concatenate([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], 1))
        parts.append(np.stack(per, axis=1).reshape(-1, 4))
    return np.concatenate(parts, 0).astype(np.float32)


def insightface_anchor_centres(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(N, 2) anchor centres x, y in input px: grid corners (not cell centres), each repeated per anchor."""
    fh, fw = height // stride, width // stride
    ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    centres = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, num_anchors, axis=0) if num_anchors > 1 else centres


class FaceDetector:
    """An ONNX face detector with batched, letterboxed inference and top-k decoding."""

    def __init__(self, model_path: str | Path, layout: Layout = "auto", input_size: int = 160,
                 nms_iou: float = 0.4, providers: list[str] | None = None, num_threads: int | None = None,
                 backend: str = "onnxruntime"):
        self.backend = backend
        if backend == "openvino":
            from pipeline.inference import OpenVINORunner, openvino_ir

            try:
                self.runner = OpenVINORunner(openvino_ir(model_path), threads=num_threads,
                                             gpu=bool(providers and providers[0] != "CPUExecutionProvider"))
            except StageError as exc:
                raise StageError(f"face detector {model_path}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - OpenVINO's reader raises RuntimeError for a bad file
                raise StageError(f"face detector {model_path} is not a loadable ONNX model: {exc}") from exc
            port = self.runner.compiled.inputs[0]
            shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
            outputs = self.runner.compiled.outputs
            self.output_names = [o.get_any_name() for o in outputs]
            self._last_dims = [o.get_partial_shape()[-1].get_length() if o.get_partial_shape()[-1].is_static
                               else None for o in outputs]
            self.input_name = port.get_any_name()
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if num_threads:
                opts.intra_op_num_threads = num_threads
                opts.inter_op_num_threads = 1
            try:
                self.session = ort.InferenceSession(str(model_path), sess_options=opts,
                                                    providers=providers or ["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for a bad file
                raise StageError(f"face detector {model_path} is not a loadable ONNX model: {exc}") from exc
            inp = self.session.get_inputs()[0]
            self.input_name = inp.name
            shape = list(inp.shape)
            self.output_names = [o.name for o in self.session.get_outputs()]
            self._last_dims = [o.shape[-1] for o in self.session.get_outputs()]
        if len(shape) != 4:
            raise StageError(f"face detector {model_path}: expected an NCHW input, got shape {shape}")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        fixed_hw = [d for d in shape[2:] if isinstance(d, int)]
        self.fixed_size = fixed_hw[0] if len(fixed_hw) == 2 and fixed_hw[0] == fixed_hw[1] else None
        self.input_size = self.fixed_size or int(input_size)
        self.nms_iou = nms_iou
        self.layout = self._pick_layout(layout, str(model_path))
        if self.layout == "insightface":
            self._plan_insightface(str(model_path))

    # -- layout ---------------------------------------------------------------------------------------
    def _pick_layout(self, layout: Layout, where: str) -> str:
        names = self.output_names
        looks_biubug6 = len(names) == 3 and list(self._last_dims) == [4, 2, 10]
        looks_insight = len(names) in (6, 9, 10, 15)
        if layout == "auto":
            if looks_biubug6:
                return "biubug6"
            if looks_insight:
                return "insightface"
            raise StageError(
                f"face detector {where}: outputs {names} match neither the biubug6 RetinaFace layout "
                "(loc, conf, landmarks) nor insightface's (score_s, bbox_s, kps_s); set faces.detector_layout"
            )
        if layout == "biubug6" and not looks_biubug6:
            raise StageError(f"face detector {where}: outputs {names} are not the biubug6 layout")
        if layout == "insightface" and not looks_insight:
            raise StageError(f"face detector {where}: outputs {names} are not insightface's layout")
        return layout

    def _plan_insightface(self, where: str) -> None:
        n = len(self.output_names)
        self.fmc = 3 if n in (6, 9) else 5
        self.strides = (8, 16, 32) if self.fmc == 3 else (8, 16, 32, 64, 128)
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.has_kps = n in (9, 15)
        if not self.has_kps:
            raise StageError(f"face detector {where} has no keypoint outputs: alignment needs 5 landmarks")
        named = {m.group(1) + m.group(2): name for name in self.output_names
                 if (m := re.fullmatch(r"(score|bbox|kps)_(\d+)", name))}
        if all(f"{k}{s}" in named for k in ("score", "bbox", "kps") for s in self.strides):
            self.io = {s: (named[f"score{s}"], named[f"bbox{s}"], named[f"kps{s}"]) for s in self.strides}
        else:  # insightface's positional convention
            f = self.fmc
            self.io = {s: (self.output_names[i], self.output_names[i + f], self.output_names[i + 2 * f])
                       for i, s in enumerate(self.strides)}

    # -- preprocessing --------------------------------------------------------------------------------
    def _letterbox(self, image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        if h == w == size:  # the stage hands over ready canvases
            return image, 1.0
        scale = size / max(h, w)
        nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=interp) if (nh, nw) != (h, w) else image
        return canvas, scale

    def _blob(self, canvases: list[np.ndarray]) -> np.ndarray:
        x = np.stack(canvases).astype(np.float32)  # (B, H, W, 3) RGB
        if self.layout == "biubug6":
            x = x[..., ::-1] - _BIUBUG6_MEAN_BGR
        else:
            x = (x - 127.5) / 128.0
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    # -- inference ------------------------------------------------------------------------------------
    def detect_batch(self, images: list[np.ndarray], max_faces: int | None = 1,
                     score_threshold: float = 0.0, native: bool = False) -> list[list[Detection]]:
        """Detect faces in RGB uint8 images; per image, detections best first (at most `max_faces`).

        `native=True` runs each image at its own size (padded to a multiple of 32) when the model accepts
        any size: for whole photos (e.g. a group photo), not for the stage's small crops.
        """
        if not images:
            return []
        if native and self.fixed_size is None:
            return [self._detect_native(img, max_faces, score_threshold) for img in images]
        size = self.input_size
        boxed = [self._letterbox(img, size) for img in images]
        results: list[list[Detection]] = []
        step = self.fixed_batch or len(boxed)
        for start in range(0, len(boxed), step):
            chunk = boxed[start:start + step]
            raw = self._run([c for c, _ in chunk], size, size)
            for (_, scale), (boxes, lms, scores) in zip(chunk, raw):
                results.append(self._select(boxes / scale, lms / scale, scores, max_faces, score_threshold))
        return results

    def _detect_native(self, image: np.ndarray, max_faces: int | None, score_threshold: float) -> list[Detection]:
        h, w = image.shape[:2]
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        canvas = np.zeros((ph, pw, 3), np.uint8)
        canvas[:h, :w] = image
        boxes, lms, scores = self._run([canvas], ph, pw)[0]
        return self._select(boxes, lms, scores, max_faces, score_threshold)

    def _run(self, canvases: list[np.ndarray], height: int, width: int) -> list[tuple[np.ndarray, ...]]:
        blob = self._blob(canvases)
        if self.backend == "openvino":
            outs = self.runner(blob)
        else:
            outs = self.session.run(None, {self.input_name: blob})
        by_name = dict(zip(self.output_names, outs))
        if self.layout == "biubug6":
            return self._decode_biubug6(by_name, len(canvases), height, width)
        return self._decode_insightface(by_name, len(canvases), height, width)

    def _decode_biubug6(self, out: dict, batch: int, height: int, width: int) -> list[tuple[np.ndarray, ...]]:
        loc, conf, landm = (out[n] for n in self.output_names)
        priors = biubug6_priors(height, width)
        v0, v1 = _BIUBUG6_VARIANCES
        scale = np.array([width, height], np.float32)
        decoded = []
        for b in range(batch):
            centre = priors[:, :2] + loc[b, :, :2] * v0 * priors[:, 2:]
            wh = priors[:, 2:] * np.exp(loc[b, :, 2:] * v1)
            boxes = np.concatenate([centre - wh / 2, centre + wh / 2], 1) * np.tile(scale, 2)
            lms = (priors[:, None, :2] + landm[b].reshape(-1, 5, 2) * v0 * priors[:, None, 2:]) * scale
            decoded.append((boxes, lms, conf[b, :, 1]))
        return decoded

    def _decode_insightface(self, out: dict, batch: int, height: int, width: int) -> list[tuple[np.ndarray, ...]]:
        per_image: list[list[tuple[np.ndarray, ...]]] = [[] for _ in range(batch)]
        for s in self.strides:
            score_name, bbox_name, kps_name = self.io[s]
            centres = insightface_anchor_centres(height, width, s, self.num_anchors)
            n = centres.shape[0]
            scores = out[score_name].reshape(batch, n)
            dist = out[bbox_name].reshape(batch, n, 4) * s
            kps = out[kps_name].reshape(batch, n, 5, 2) * s
            for b in range(batch):
                boxes = np.concatenate([centres - dist[b, :, :2], centres + dist[b, :, 2:]], 1)
                per_image[b].append((boxes, kps[b] + centres[:, None, :], scores[b]))
        return [tuple(np.concatenate([p[i] for p in parts], 0) for i in range(3)) for parts in per_image]

    def _select(self, boxes: np.ndarray, lms: np.ndarray, scores: np.ndarray, max_faces: int | None,
                score_threshold: float) -> list[Detection]:
        finite = np.isfinite(scores) & np.isfinite(boxes).all(1) & np.isfinite(lms).reshape(len(lms), -1).all(1)
        idx = np.nonzero(finite & (scores >= score_threshold))[0]
        if idx.size == 0:
            return []
        if max_faces == 1:
            # The single best box survives NMS whatever the IoU, so NMS is skipped (the official top-1 rule).
            keep = idx[[int(np.argmax(scores[idx]))]]
        else:
            top = idx[np.argsort(-scores[idx], kind="stable")[:5000]]
            keep = top[nms(boxes[top], scores[top], self.nms_iou)]
            if max_faces is not None:
                keep = keep[:max_faces]
        return [Detection(boxes[i].astype(np.float32), lms[i].astype(np.float32), float(scores[i])) for i in keep]


# -- the registry: `faces.detector: <name>` builds the registered factory ---------------------------------


class Detector(Protocol):
    """What the faces stage and the photo chain (pipeline/faces/photos.py) need of a face detector."""

    input_size: int  # the square canvas side the stage letterboxes each pre-crop into

    def detect_batch(self, images: list[np.ndarray], max_faces: int | None = 1, score_threshold: float = 0.0,
                     native: bool = False) -> list[list[Detection]]: ...


DetectorFactory = Callable[["FacesConfig", "Path | None", str], Detector]  # (faces config, weights, backend)


@dataclass(frozen=True)
class DetectorEntry:
    name: str
    factory: DetectorFactory
    default_weights: str | None  # resolved through pipeline.weights when faces.detector_model is None
    module: str = field(default="", compare=False)


DETECTORS: Registry[DetectorEntry] = Registry("face detector")


def register_detector(name: str, *, default_weights: str | None) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorate a factory to make `faces.detector: <name>` build it (as `register_embedder` does for embedders)."""

    def add(factory: DetectorFactory) -> DetectorFactory:
        DETECTORS.add(name, DetectorEntry(name, factory, default_weights, factory.__module__))
        return factory

    return add


def detector_entry(name: str) -> DetectorEntry:
    return DETECTORS.entry(name)


def _onnx_detector(cfg: FacesConfig, weights: Path | None, backend: str) -> FaceDetector:
    from pipeline.faces.embedders import onnx_providers

    if weights is None:
        raise StageError(f"the {cfg.detector} detector needs an ONNX file in faces.detector_model")
    return FaceDetector(weights, layout=cfg.detector_layout, input_size=cfg.detector_input,
                        nms_iou=cfg.detector_nms, providers=onnx_providers(cfg.device),
                        num_threads=cfg.num_threads, backend=backend)


@register_detector("retinaface", default_weights="retinaface_r50.onnx")
def _retinaface(cfg: FacesConfig, weights: Path | None, backend: str) -> Detector:
    return _onnx_detector(cfg, weights, backend)  # either output layout (biubug6 or insightface)


@register_detector("scrfd", default_weights="scrfd_10g_bnkps.onnx")
def _scrfd(cfg: FacesConfig, weights: Path | None, backend: str) -> Detector:
    det = _onnx_detector(cfg, weights, backend)
    if det.layout != "insightface":
        raise StageError(f"{weights} has the {det.layout} layout; SCRFD models use insightface's")
    return det
