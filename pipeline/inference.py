"""Compiled inference backends for the model stages: torch, ONNX Runtime, OpenVINO.

A model stage names `backend: auto | torch | onnxruntime | openvino` in its config section. `auto` takes the
fastest backend that is installed and correct on this machine (`choose_backend`): on CPU OpenVINO, then ONNX
Runtime, then torch; with a GPU, ONNX Runtime's TensorRT/CUDA execution providers when onnxruntime has them,
else torch on CUDA. The chosen backend is part of the stage's config hash (outputs may differ in the last bits
between backends), so a run never mixes rows of two backends.

Graphs are exported once from the trusted checkpoint with the libraries' own exporters (Ultralytics `export`
for YOLO, `torch.onnx.export` for torch modules), written next to the weights under `exported/<stem>-<sha>/`
(sha = the first 16 hex digits of the checkpoint's sha256, so a changed checkpoint never reuses a stale graph),
and reused; `webbody models export` makes them ahead of a run. OpenVINO reads the same ONNX file through its
runtime `Core` (never the `ovc` converter tool, which carries OpenVINO's telemetry) and caches the IR beside it.

Pre- and post-processing of YOLO pose stays Ultralytics' own code (`LetterBox`, `nms.non_max_suppression`,
`ops.scale_boxes`, `ops.scale_coords`), called the way its predictor calls them, so a compiled backend returns
the same persons as `YOLO.predict`; only the network runs elsewhere. NMS is always torchvision's kernel (the one
Ultralytics' predictor ends up using), never chosen by import history: see `CompiledPose.predict`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
CHOICES = ("auto", *BACKENDS)
EXPORT_DIR = "exported"

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], str] = {}


# -- choosing ---------------------------------------------------------------------------------------------
def installed_backends() -> list[str]:
    """The backends whose runtime imports here, in BACKENDS order."""
    import importlib.util

    out = ["torch"]
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnxruntime")
    if importlib.util.find_spec("openvino") is not None:
        out.append("openvino")
    return out


def gpu_providers() -> list[str]:
    """ONNX Runtime's GPU execution providers available here, best first (TensorRT, then CUDA)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    have = set(ort.get_available_providers())
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]


def choose_backend(requested: str, gpu: bool = False) -> str:
    """The backend to run: `requested` itself (checked installed), or for 'auto' the fastest one here."""
    name = (requested or "auto").strip().lower()
    if name not in CHOICES:
        raise StageError(f"backend '{requested}' not understood: choose one of {', '.join(CHOICES)}")
    have = installed_backends()
    if name != "auto":
        if name not in have:
            raise StageError(f"backend '{name}' is not installed here (installed: {', '.join(have)})")
        return name
    if gpu:
        return "onnxruntime" if gpu_providers() else "torch"
    # Measured on CPU (benchmarks/persons.py, docs/benchmarks.md): OpenVINO > ONNX Runtime > torch.
    for candidate in ("openvino", "onnxruntime"):
        if candidate in have:
            return candidate
    return "torch"


def worker_threads(cfg: Any, num_actors: int | None = None, actor_cpus: float | None = None) -> int:
    """Intra-op threads for one worker of a model stage (`cfg` a BuildConfig; `num_actors`/`actor_cpus` a stage
    section's overrides of the run section's).

    The local executor runs one worker: every core of this machine. On Ray, a fixed pool (`num_actors`) splits
    this machine's cores over its actors; a pool sized from the cluster (`num_actors: null`, as
    configs/webbody4m.yaml) has as many actors as the cluster has CPUs / `actor_cpus` (or GPUs / `actor_gpus`),
    so each actor gets its CPU reservation, `actor_cpus` rounded down, at least one thread.
    """
    cores = os.cpu_count() or 1
    if cfg.run.executor == "local":
        return cores
    actors = num_actors or cfg.run.num_actors
    if actors:
        return max(1, cores // actors)
    cpus = actor_cpus if actor_cpus is not None else cfg.run.actor_cpus
    return max(1, int(cpus))


def import_openvino():
    """`import openvino` with its telemetry off.

    Importing openvino imports its `ovc` converter, which creates an `openvino_telemetry.Telemetry` at import
    and sends usage events unless the user opted out in their home folder. When `openvino_telemetry` cannot be
    imported, openvino falls back to its own no-op stub (`openvino.tools.ovc.telemetry_stub`): we make it
    unimportable for this process before openvino's first import. (If something imported openvino earlier,
    its choice stands; the stage never calls the converter itself.)
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type] - None = "not importable"
    import openvino

    return openvino


# -- cache of exported graphs ---------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _digests:
            return _digests[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        _digests[key] = digest
    return digest


def export_dir(weights: str | os.PathLike) -> Path:
    """Where graphs exported from `weights` live: next to it, else (read-only folder) in the cache directory."""
    w = Path(weights)
    name = f"{w.stem}-{file_sha256(w)[:16]}"
    beside = w.parent / EXPORT_DIR / name
    try:
        beside.mkdir(parents=True, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    from pipeline.runtime import cache_dir

    fallback = cache_dir() / EXPORT_DIR / name
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def cached(target: Path, make: Callable[[Path], None]) -> Path:
    """`target` if present, else `make(tmp_dir)` writes it into a private temp dir and it is moved into place.

    A file lock serialises concurrent exporters (several actors starting at once); the move is atomic, so a
    reader never sees half a file.
    """
    from filelock import FileLock

    if target.is_file():
        return target
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(prefix=".export-", dir=target.parent) as tmp:
            make(Path(tmp))
            produced = Path(tmp) / target.name
            if not produced.is_file():
                raise StageError(f"export of {target.name} produced no file")
            for extra in Path(tmp).iterdir():  # side files (an IR's .bin, metadata) go first
                if extra.name != target.name:
                    os.replace(extra, target.parent / extra.name)
            os.replace(produced, target)
    return target


def openvino_ir(onnx_path: str | os.PathLike) -> Path:
    """The OpenVINO IR (.xml + .bin, float32) of an ONNX file, made once by OpenVINO's runtime: beside a graph
    we exported, in the `exported/` folder of a user's ONNX weight file."""
    onnx_path = Path(onnx_path)
    if onnx_path.parent.parent.name == EXPORT_DIR:
        target = onnx_path.with_suffix(".xml")
    else:
        target = export_dir(onnx_path) / (onnx_path.stem + ".xml")

    def make(tmp: Path) -> None:
        ov = import_openvino()
        model = ov.Core().read_model(str(onnx_path))
        # save_model first writes the .bin, then the .xml: `cached` moves the .bin into place before the .xml.
        ov.save_model(model, str(tmp / target.name), compress_to_fp16=False)

    return cached(target, make)


# -- runners: one call = one batch through the network -----------------------------------------------------
class OnnxRunner:
    """An ONNX Runtime session: numpy in, list of numpy outputs out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, gpu: bool = False):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = [*gpu_providers(), "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise StageError(f"{path} is not a loadable ONNX model: {exc}") from exc
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.inputs, arrays)))


class OpenVINORunner:
    """An OpenVINO compiled model (CPU, float32, latency hint, our thread count)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, gpu: bool = False):
        ov = import_openvino()
        core = ov.Core()
        device = "GPU" if gpu and "GPU" in core.available_devices else "CPU"
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            # f32 on purpose: bf16 on CPUs with AMX would change the answers beyond the tests' tolerances.
            config["INFERENCE_PRECISION_HINT"] = "f32"
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with C++ messages
            raise StageError(f"OpenVINO could not load {path}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.n_inputs = len(self.compiled.inputs)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({i: np.ascontiguousarray(a) for i, a in enumerate(arrays[: self.n_inputs])})
        return [np.array(result[o]) for o in self.compiled.outputs]


def make_runner(backend: str, onnx_path: Path, threads: int | None = None, gpu: bool = False):
    """A runner for an exported ONNX graph on `backend` ('onnxruntime' or 'openvino')."""
    if backend == "onnxruntime":
        return OnnxRunner(onnx_path, threads=threads, gpu=gpu)
    if backend == "openvino":
        return OpenVINORunner(openvino_ir(onnx_path), threads=threads, gpu=gpu)
    raise StageError(f"no compiled runner for backend '{backend}'")


# -- YOLO pose --------------------------------------------------------------------------------------------
@dataclass
class PoseDetections:
    """One image's persons, in its own pixels: boxes (N, 4) x1y1x2y2, scores (N,), keypoints (N, 17, 3)."""

    xyxy: np.ndarray
    conf: np.ndarray
    keypoints: np.ndarray


class CompiledPose:
    """A YOLO pose network on ONNX Runtime or OpenVINO, with Ultralytics' pre- and post-processing."""

    def __init__(self, onnx_path: Path, backend: str, imgsz: int, threads: int | None = None,
                 gpu: bool = False):
        """`onnx_path`: the graph `pipeline.persons.yolo_pose_onnx` exported, with its metadata beside it."""
        meta = json.loads(onnx_path.with_suffix(".json").read_text())
        self.stride = int(meta["stride"])
        self.nc = len(meta["names"])
        self.kpt_shape = tuple(meta["kpt_shape"])
        self.end2end = bool(meta["end2end"])
        self.imgsz = int(imgsz)
        self.backend = backend
        self.runner = make_runner(backend, onnx_path, threads=threads, gpu=gpu)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """BGR uint8 images -> (B, 3, H, W) float32 RGB in [0, 1], letterboxed as Ultralytics' predictor does
        for a dynamic-shape model (minimum rectangle when all images share a shape, else the square)."""
        from ultralytics.data.augment import LetterBox

        same = len({im.shape for im in images}) == 1
        box = LetterBox((self.imgsz, self.imgsz), auto=same, stride=self.stride)
        x = np.stack([box(image=im) for im in images])
        x = x[..., ::-1].transpose(0, 3, 1, 2)  # BGR->RGB, BHWC->BCHW
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)

    def predict(self, images: list[np.ndarray], conf: float, iou: float, max_det: int) -> list[PoseDetections]:
        import torch
        from ultralytics.utils import nms, ops

        if not images:
            return []
        # Ultralytics' NMS runs torchvision's kernel only when torchvision is already imported
        # (`"torchvision" in sys.modules`), else its own TorchNMS, and the two keep different boxes among equal
        # scores. Its torch predictor imports torchvision, so without this import a compiled stage's persons
        # would depend on what the process ran before (a torch-backend stage, or nothing: a fresh Ray actor).
        import torchvision  # noqa: F401 - imported for that side effect

        x = self.preprocess(images)
        raw = self.runner(x)[0]
        preds = nms.non_max_suppression(torch.from_numpy(raw), conf, iou, None, False, max_det=max_det,
                                        nc=self.nc, end2end=self.end2end)
        out = []
        for pred, im in zip(preds, images):
            boxes = ops.scale_boxes(x.shape[2:], pred[:, :4].clone(), im.shape)
            kpts = ops.scale_coords(x.shape[2:], pred[:, 6:].reshape(len(pred), *self.kpt_shape).clone(), im.shape)
            out.append(PoseDetections(boxes.numpy().astype(np.float64), pred[:, 4].numpy().astype(np.float64),
                                      kpts.numpy().astype(np.float64)))
        return out


def ultralytics_detections(results: list[Any]) -> list[PoseDetections]:
    """Ultralytics `Results` of a pose predict -> PoseDetections (same fields as CompiledPose returns)."""
    out = []
    for r in results:
        if r.boxes is None or len(r.boxes) == 0:
            out.append(PoseDetections(np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 17, 3))))
            continue
        out.append(PoseDetections(r.boxes.xyxy.cpu().numpy().astype(np.float64),
                                  r.boxes.conf.cpu().numpy().astype(np.float64),
                                  r.keypoints.data.cpu().numpy().astype(np.float64)))
    return out


# -- torch modules (KP-RPE) -------------------------------------------------------------------------------
def module_digest(module: Any, *code_files: str | os.PathLike) -> str:
    """sha256 over a module's state dict (names, shapes, bytes) and the source of its architecture code."""
    import torch

    h = hashlib.sha256()
    for f in code_files:
        h.update(Path(f).read_bytes())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def torch_module_onnx(module: Any, example: tuple[Any, ...], target: Path, input_names: list[str],
                      dynamic_batch: bool = True) -> Path:
    """Export a torch module once with torch.onnx (dynamic batch on every input and output) to `target`."""

    def make(tmp: Path) -> None:
        import torch

        axes = {n: {0: "batch"} for n in [*input_names, "output"]} if dynamic_batch else None
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about the model's own shape checks (constant for a traced graph) and about the
            # TorchScript exporter being the legacy one; the graph is checked against torch in the tests.
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example, str(tmp / target.name), input_names=input_names,
                              output_names=["output"], dynamic_axes=axes, opset_version=17, dynamo=False)

    return cached(target, make)
