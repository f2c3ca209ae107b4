"""The persons stage: downloaded images -> one row per person (padded body crop, box, 17 keypoints).

Official recipe (docs/official-pipeline.md 1c): an Ultralytics pose model on the downloaded 640 canvas; every
person with box confidence >= 0.7, at most 6, in confidence order; box padded 5% of its width/height per side;
the crop cut from the downloaded image. Which person is the identity is decided later by face clustering, so
all confident persons are kept unless `mode: dominant` asks for one per image.

Done differently from the official code, on purpose: undecodable rows are counted and skipped (never "dummy"
samples); keypoints keep Ultralytics' per-point confidence as their visibility; the area of a padded box
outside the image is filled white like the download's border (not black); crops are encoded once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import BuildConfig, PersonsConfig, hashed_dump
from pipeline.geometry import Transform, crop_window, crop_with_fill, pad_box
from pipeline.inference import (
    EXPORT_DIR,
    CompiledPose,
    PoseDetections,
    cached,
    choose_backend,
    export_dir,
    file_sha256,
    ultralytics_detections,
    worker_threads,
)
from pipeline.stage import BatchResult, ShardStage, StageError, config_hash
from pipeline.weights import resolve_weights
from schemas.devices import DeviceError, resolve_device
from schemas.imaging import decode_image
from schemas.persons import NUM_KEYPOINTS, PERSONS
from schemas.tables import DOWNLOAD

log = logging.getLogger(__name__)

ARCH_SUFFIXES = (".yaml", ".yml")  # an Ultralytics model definition: random weights, for plumbing tests


def resolve_model(name: str) -> str:
    """The model file to load: a weight path (resolve_weights), or an Ultralytics yaml name/path as given."""
    if name.endswith(ARCH_SUFFIXES):
        return name
    return str(resolve_weights(name, kind="person pose model", download=_ultralytics_download))


def _ultralytics_download(name: str, target_dir: Path) -> Path:
    # Ultralytics' own release-asset download (only called when online); saved into the weights cache.
    from ultralytics.utils.downloads import attempt_download_asset

    target_dir.mkdir(parents=True, exist_ok=True)
    path = Path(attempt_download_asset(target_dir / name))
    if not path.is_file():
        raise FileNotFoundError(f"Ultralytics has no release asset named '{name}'")
    return path


def load_pose_model(source: str) -> Any:
    """An Ultralytics model that predicts 17 COCO keypoints, or a StageError naming the file.

    A checkpoint is loaded through Ultralytics' restricted load (`torch.load(weights_only=True)` against its
    allow-list of known Ultralytics/torch model classes, and model construction without `eval`): a crafted
    pickle is refused before any of its code runs (tests/test_persons.py). Plain `YOLO(path)` would unpickle
    the file fully.
    """
    import torch
    from ultralytics import YOLO

    if source.endswith(ARCH_SUFFIXES):
        torch.manual_seed(0)  # a random-initialised model is still the same model on every worker
    try:
        with restricted_ultralytics_load():
            model = YOLO(source)  # the task comes from the checkpoint or the yaml
    except Exception as exc:  # noqa: BLE001 - a broken, foreign or unsafe file must say which file it is
        raise StageError(f"could not load pose model {source} (weights-only load): {exc}") from exc
    kpt_shape = getattr(model.model, "kpt_shape", None)
    if model.task != "pose" or list(kpt_shape or []) != [NUM_KEYPOINTS, 3]:
        raise StageError(
            f"{source} is not a COCO-17 pose model (task {model.task}, kpt_shape {kpt_shape}): "
            "use e.g. yolov8n-pose.pt or yolo11n-pose.pt"
        )
    return model


_SAFE_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def restricted_ultralytics_load():
    """Within this block, Ultralytics loads checkpoints with its restricted (weights-only) loader.

    Ultralytics reads its `ULTRALYTICS_SAFE_LOAD` switch once, at import, into `ultralytics.nn.tasks.SAFE_LOAD`,
    which `YOLO(path)` consults; we turn that switch on for our own loads only (other users of Ultralytics in
    the process keep their setting), under a lock so concurrent loads in one process agree.
    """
    from ultralytics.nn import tasks

    if not getattr(tasks, "_SafeLoad", None) or not tasks._SafeLoad.SUPPORTED:
        raise StageError("this Ultralytics/torch cannot load checkpoints weights-only: need torch >= 2.6 and "
                         "ultralytics >= 8.4 (its ULTRALYTICS_SAFE_LOAD loader)")
    with _SAFE_LOAD_LOCK:
        before = tasks.SAFE_LOAD
        tasks.SAFE_LOAD = True
        try:
            yield
        finally:
            tasks.SAFE_LOAD = before


def pick_device(device: str) -> str:
    """'cpu', 'cuda[:n]' or 'auto' (a GPU when there is one), through schemas.devices; a GPU that is absent is a
    StageError."""
    try:
        return resolve_device(device, "persons.device")
    except DeviceError as exc:
        raise StageError(str(exc)) from None


class PersonsStage(ShardStage):
    name = "persons"
    input_schema = DOWNLOAD
    output_schema = PERSONS
    sort_keys = ("sample_id", "detection_index")
    uses_model = True

    def __init__(self, config: PersonsConfig | None = None, threads: int | None = None):
        super().__init__(config or PersonsConfig())
        self.cfg: PersonsConfig = self.config
        # torch intra-op threads for this worker; None = all cores of the machine.
        self.threads = threads or self.cfg.threads or None
        self.model: Any = None  # an Ultralytics YOLO (backend torch) or a CompiledPose
        self.device = "cpu"
        self.backend = "torch"

    def config_hash(self) -> str:
        # The backend that will run (auto resolved) is part of the hash: backends agree only to float precision.
        doc = hashed_dump(self.cfg)  # without the fields marked execution() in pipeline/config.py
        doc["backend"] = self.backend_name()
        return config_hash(doc)

    def backend_name(self) -> str:
        return choose_backend(self.cfg.backend, gpu=pick_device(self.cfg.device) != "cpu")

    # -- model --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from pipeline.runtime import ensure_offline_env

        ensure_offline_env()  # a worker of an external Ray cluster may not have the driver's environment
        import torch

        self.device = pick_device(self.cfg.device)
        self.backend = self.backend_name()
        source = resolve_model(self.cfg.model)
        threads = self.threads or (os.cpu_count() or 1)
        if self.backend == "torch":
            self.model = load_pose_model(source)
        else:
            self.model = CompiledPose(yolo_pose_onnx(source, self.cfg.imgsz), self.backend, self.cfg.imgsz, threads=threads,
                                      gpu=self.device != "cpu")
        # The first predict selects the device, and Ultralytics then sets torch to cores-1 threads (1 on two
        # cores); warm up first, then set our own thread count (torch also runs the compiled backends' NMS).
        self._predict([np.full((64, 64, 3), 255, np.uint8)])
        if self.device == "cpu":
            torch.set_num_threads(threads)

    def _predict(self, images: list[np.ndarray]) -> list[PoseDetections]:
        # conf = our threshold: NMS only removes lower-scored boxes, so the persons >= threshold are the same
        # as with the library's 0.25 followed by a filter, and NMS has fewer boxes to sort.
        if self.backend != "torch":
            return self.model.predict(images, conf=self.cfg.conf_threshold, iou=self.cfg.iou,
                                      max_det=self.cfg.max_persons)
        return ultralytics_detections(self.model.predict(
            images, imgsz=self.cfg.imgsz, conf=self.cfg.conf_threshold, iou=self.cfg.iou,
            device=self.device, verbose=False, max_det=self.cfg.max_persons,
        ))

    # -- rows ---------------------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> BatchResult:

        drops: Counter = Counter()
        rows = batch.select(["sample_id", "source_label", "name", "url", "status", "image", "image_sha256"]).to_pylist()
        todo: list[tuple[dict, np.ndarray]] = []
        for row in rows:
            if row["status"] != "success":
                drops["not_downloaded"] += 1
                continue
            data = row["image"]
            img = decode_image(data, rgb=False)  # BGR, as YOLO takes it
            if img is None:
                log.warning("persons: %s could not be decoded (%d bytes)", row["sample_id"], len(data or b""))
                drops["decode_error"] += 1
                continue
            todo.append((row, img))
        out: list[dict] = []
        if todo:
            results = self._predict([img for _, img in todo])
            for (row, img), result in zip(todo, results, strict=True):
                persons = self._persons(row, img, result)
                if not persons:
                    drops["no_person"] += 1
                out.extend(persons)
        return BatchResult(PERSONS.from_rows(out), drops)

    def _persons(self, row: dict, img: np.ndarray, result: PoseDetections) -> list[dict]:
        if len(result.conf) == 0:
            return []
        xyxy, conf = result.xyxy, result.conf
        kps = result.keypoints  # (N, 17, 3): x, y, conf in image px
        order = [int(i) for i in np.argsort(-conf, kind="stable") if conf[i] >= self.cfg.conf_threshold]
        order = order[: self.cfg.max_persons]
        ranked = list(enumerate(order))  # detection_index = rank among the confident persons
        if self.cfg.mode == "dominant" and ranked:
            # One person per image: the largest box; confidence order breaks ties.
            areas = [(xyxy[i, 2] - xyxy[i, 0]) * (xyxy[i, 3] - xyxy[i, 1]) for _, i in ranked]
            ranked = [ranked[int(np.argmax(areas))]]
        h, w = img.shape[:2]
        persons = []
        for det_idx, i in ranked:
            padded = pad_box(xyxy[i], self.cfg.box_padding)
            window = crop_window(padded)
            crop = crop_with_fill(img, window, self.cfg.fill)
            to_crop = Transform.crop(window)
            persons.append({
                "person_id": f"{row['sample_id']}_{det_idx}",
                "sample_id": row["sample_id"],
                "detection_index": det_idx,
                "source_label": row["source_label"],
                "name": row["name"],
                "url": row["url"],
                "image_sha256": row["image_sha256"],
                "box": padded.tolist(),
                "det_box": xyxy[i].tolist(),
                "box_score": float(conf[i]),
                "keypoints": kps[i].reshape(-1).tolist(),
                "keypoints_crop": to_crop.points(kps[i]).reshape(-1).tolist(),
                "crop": self._encode(crop),
                "crop_format": self.cfg.crop_format,
                "crop_x": window[0],
                "crop_y": window[1],
                "crop_width": crop.shape[1],
                "crop_height": crop.shape[0],
                "image_width": w,
                "image_height": h,
            })
        return persons

    def _encode(self, crop: np.ndarray) -> bytes:
        import cv2

        if self.cfg.crop_format == "png":
            ok, buf = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        else:
            ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.crop_quality])
        if not ok:
            raise RuntimeError(f"could not encode a {crop.shape} crop as {self.cfg.crop_format}")
        return buf.tobytes()


def yolo_pose_onnx(weights: str | os.PathLike, imgsz: int) -> Path:
    """The ONNX graph (dynamic batch and size) of a YOLO pose checkpoint, exported once by Ultralytics.

    The checkpoint is loaded through `pipeline.persons.load_pose_model` (restricted, weights-only), then
    Ultralytics' own `export` writes the graph; its metadata (stride, names, keypoint shape) goes beside it.
    """
    src = Path(weights)
    random_init = str(weights).endswith(ARCH_SUFFIXES)
    if random_init:  # an architecture yaml (random weights, seeded): keyed by name and Ultralytics version
        import ultralytics

        from pipeline.runtime import cache_dir

        folder = cache_dir() / EXPORT_DIR / f"{src.stem}-random-ultralytics{ultralytics.__version__}"
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = export_dir(src)
    target = folder / f"pose-{int(imgsz)}.onnx"

    def make(tmp: Path) -> None:
        if random_init:
            model = load_pose_model(str(weights))
        else:
            copy = tmp / src.name  # Ultralytics writes the export next to the file it loaded
            shutil.copyfile(src, copy)
            model = load_pose_model(str(copy))
        meta = {"stride": int(max(model.model.stride.tolist())), "names": {int(k): v for k, v in model.names.items()},
                "kpt_shape": list(model.model.kpt_shape), "end2end": bool(getattr(model.model, "end2end", False)),
                "imgsz": int(imgsz), "source": str(weights) if random_init else file_sha256(src)}
        out = Path(model.export(format="onnx", dynamic=True, imgsz=int(imgsz), simplify=False, verbose=False))
        os.replace(out, tmp / target.name)
        for leftover in tmp.iterdir():  # the checkpoint copy
            if leftover.suffix == ".pt":
                leftover.unlink()
        (tmp / (target.stem + ".json")).write_text(json.dumps(meta))

    return cached(target, make)


def export_pose_model(source: str, imgsz: int, backend: str) -> Path:
    """The compiled graph of a pose model for `backend` (exported once, cached beside the weights)."""
    from pipeline.inference import openvino_ir

    onnx_path = yolo_pose_onnx(source, imgsz)
    return openvino_ir(onnx_path) if backend == "openvino" else onnx_path


def executor_for(cfg: BuildConfig):
    """The build's executor, with the persons section's actor settings where given (else the run section's)."""
    from pipeline.executors import make_executor
    from pipeline.registry import ray_executor_options

    if cfg.run.executor == "local":
        return make_executor("local")
    p = cfg.persons
    return make_executor("ray", **ray_executor_options(cfg, num_actors=p.num_actors, actor_cpus=p.actor_cpus,
                                                       actor_gpus=p.actor_gpus))


def threads_per_worker(cfg: BuildConfig) -> int:
    """torch/runtime threads of one persons worker: `persons.threads`, else the worker's share of the cores
    (pipeline.inference.worker_threads), with the persons section's pool settings overriding the run's."""
    if cfg.persons.threads:
        return cfg.persons.threads
    return worker_threads(cfg, num_actors=cfg.persons.num_actors, actor_cpus=cfg.persons.actor_cpus)


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Run the persons stage over the download output `inputs['download']`; return the roll-up stats."""
    # Fail fast on the driver: a missing weight, a model that is not a pose model or an absent GPU is reported
    # as a StageError before any worker starts (inside a Ray actor it would surface as an opaque ActorDiedError).
    source = resolve_model(cfg.persons.model)
    pick_device(cfg.persons.device)
    stage = PersonsStage(cfg.persons, threads=threads_per_worker(cfg))
    backend = stage.backend_name()
    if backend != "torch":  # export once here, so the workers find the graph cached instead of racing for it
        export_pose_model(source, cfg.persons.imgsz, backend)
    elif cfg.run.executor != "local":  # the local executor loads it in this process anyway
        load_pose_model(source)
    return executor_for(cfg).run(stage, inputs["download"], output, overwrite).stats
