"""Face embedders behind one small interface, each with its own similarity thresholds.

An embedder turns aligned faces into raw (not normalised) float32 features:
- "kprpe": CVLface ViT + KP-RPE (the paper's): aligned 112 RGB in [-1, 1] plus the 5 landmarks in [0, 1].
- "arcface": an insightface ArcFace ONNX (e.g. `w600k_r50.onnx`) through `insightface.model_zoo.get_model`,
  fed BGR 112 crops exactly as insightface does ((x - 127.5) / 127.5, channels swapped to RGB in the blob).
- "dlib": dlib's CC0 ResNet: its own 5-point shape predictor inside the detected box, a 150 px face chip
  (padding 0.25), a 128-d descriptor. Runs anywhere on CPU, fully offline (the demo's embedder).

Embedders are registered with `register_embedder` (the way timm registers models): each entry carries its
factory, its default weights and its clean thresholds, so a new embedder is one file with one decorated
factory (tests/toy_embedder.py is one, named in a config's `plugins`). The thresholds are cosine similarities
of L2-normalised features (the clean stage normalises before comparing), with field names of
`pipeline.config.EmbedderThresholds`; `dbscan_eps` is a cosine *distance* 1 - clip(cos, 0, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.config import EmbedderThresholds
from pipeline.registry import Registry
from pipeline.stage import StageError
from schemas.devices import DeviceError, resolve_device

if TYPE_CHECKING:
    from pipeline.config import FacesConfig

# The paper's cosine thresholds (docs/official-pipeline.md 1f/1g) for the 512-d ArcFace-style embedders.
# They are EmbedderThresholds' defaults, defined once there.
_COSINE_PAPER = EmbedderThresholds().model_dump()

# dlib's descriptors live on another scale: same person when L2 < 0.6 (dlib's documented rule), and they are not
# unit-norm (measured norms 1.23-1.60) and share a large common component, so different people already have high
# cosines. Measured with RetinaFace-mnet0.25 boxes on the asset photos (41 faces, tests/test_faces_models.py,
# docs/benchmarks.md): Obama-Obama cos 0.949-0.974 (L2 0.32-0.44); Obama vs everyone else cos <= 0.878 (L2 >= 0.68);
# different people in colour photos cos <= 0.903 (L2 >= 0.64); pairs at L2 0.55-0.65 have cos 0.875-0.925, median
# 0.901. Caveat: small grey faces (the 1927 Solvay photo) collapse together (median L2 0.60 between different
# people): dlib is a CPU/offline fallback, not the paper's embedder.
# So: DBSCAN links at cos >= 0.90 (~L2 0.6, eps 0.10), merge and val overlap at 0.92, ambiguous from 0.90,
# duplicate images at 0.99. The one-image overlap rule's member ratio (pipeline/clean/overlap.py) is a ratio
# of cosines, so on this scale a stranger scores high too: on the asset photos, an Obama identity (obama,
# obama2 and their augmentations) gives obama3 0.957 and the 41 other faces at most 0.888, so the cut is 0.92
# (the cosine embedders' 0.73 would remove the identity for any stranger's photo).
_DLIB = {"dbscan_eps": 0.10, "dbscan_min_samples": 2, "merge": 0.92, "ambiguous": 0.90,
         "val_overlap": 0.92, "duplicate": 0.99, "val_overlap_image": 0.92}

@dataclass
class FaceCrop:
    """One detected face, in the forms the embedders need."""

    aligned: np.ndarray  # (112, 112, 3) uint8 RGB, ArcFace-template aligned
    landmarks: np.ndarray  # (5, 2) float, the detected landmarks mapped into `aligned` px
    image: np.ndarray  # (H, W, 3) uint8 RGB the face was detected in (dlib aligns from it itself)
    box: np.ndarray  # (4,) x1, y1, x2, y2 of the face in `image` px


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, faces: list[FaceCrop]) -> np.ndarray:
        """(N, dim) float32 raw features, one row per face, independent of how faces are batched."""
        ...


def _torch_device(device: str) -> str:
    try:
        return resolve_device(device, "faces.device")
    except DeviceError as exc:
        raise StageError(str(exc)) from None


class KPRPEEmbedder:
    """CVLface ViT KP-RPE face model (sapiensid.kprpe_face)."""

    name = "kprpe"

    def __init__(self, weights: Path | None, size: str = "base", device: str = "auto",
                 num_threads: int | None = None, backend: str = "torch"):
        import torch

        from sapiensid.kprpe_face import (
            CheckpointMismatchError,
            build_kprpe_face_vit,
            load_kprpe_face_weights,
        )

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = _torch_device(device)
        if weights is None:
            # Random weights: only for tests and benchmarks of the code path, never a real build.
            torch.manual_seed(0)
        self.model = build_kprpe_face_vit(size)
        if weights is not None:
            try:
                load_kprpe_face_weights(self.model, weights)
            except CheckpointMismatchError as exc:
                raise StageError(f"KP-RPE weights {weights} do not fit the '{size}' model: {exc}") from exc
            except (ValueError, FileNotFoundError) as exc:  # e.g. a pickle with objects: refused, never run
                raise StageError(f"KP-RPE weights {weights} could not be read (weights-only load): {exc}") from exc
        self.model.eval()
        self.dim = int(self.model.output_dim)
        self.backend = backend
        self.runner = None
        if backend != "torch":
            from pipeline.inference import make_runner

            self.runner = make_runner(backend, kprpe_onnx(self.model, weights, size), threads=num_threads,
                                      gpu=self.device != "cpu")
            self.model = None  # the compiled graph holds its own copy of the weights
        else:
            self.model.to(self.device)

    def inputs(self, faces: list[FaceCrop]) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, 112, 112) RGB in [-1, 1] and (B, 5, 2) landmarks in [0, 1], float32."""
        x = np.stack([f.aligned for f in faces]).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(127.5) - 1
        kps = np.stack([f.landmarks for f in faces]).astype(np.float32) / np.float32(112.0)
        return np.ascontiguousarray(x), kps

    def embed(self, faces: list[FaceCrop]) -> np.ndarray:
        import torch

        if not faces:
            return np.zeros((0, self.dim), np.float32)
        x, kps = self.inputs(faces)
        if self.runner is not None:
            return np.asarray(self.runner(x, kps)[0], np.float32)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(kps).to(self.device))
        return out.float().cpu().numpy()


def kprpe_onnx(model, weights: Path | None, size: str) -> Path:
    """The ONNX graph of a KP-RPE model (dynamic batch), exported once with torch.onnx and cached by checksum:
    beside its weight file, or for random weights under the cache directory, keyed by the state dict and the
    architecture's source."""
    import torch

    import sapiensid.kprpe_face as arch
    from pipeline.inference import EXPORT_DIR, export_dir, file_sha256, module_digest, torch_module_onnx
    from pipeline.runtime import cache_dir

    if weights is not None:
        folder = export_dir(weights)
        key = file_sha256(arch.__file__)[:12]  # the same weights through changed architecture code: re-export
    else:
        key = module_digest(model, arch.__file__)[:16]
        folder = cache_dir() / EXPORT_DIR / f"kprpe-{size}-random"
        folder.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, 3, 112, 112), torch.full((2, 5, 2), 0.5))
    return torch_module_onnx(model, example, folder / f"kprpe-{size}-{key}.onnx", ["image", "keypoints"])


class ArcFaceEmbedder:
    """An insightface ArcFace ONNX recognition model, loaded by insightface's model zoo."""

    name = "arcface"

    def __init__(self, weights: Path, device: str = "auto", num_threads: int | None = None):
        import onnxruntime as ort
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        providers = onnx_providers(device)
        opts = None
        if num_threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        try:
            model = get_model(str(weights), providers=providers, sess_options=opts)
        except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime/insightface raise many types
            raise StageError(f"ArcFace model {weights} could not be loaded: {exc}") from exc
        if not isinstance(model, ArcFaceONNX):
            raise StageError(
                f"{weights} is not an ArcFace recognition model for insightface (routed to "
                f"{type(model).__name__}): it needs one square NCHW input >= 112 px and one output"
            )
        if tuple(model.input_size) != (112, 112):
            raise StageError(f"ArcFace model {weights} takes {model.input_size} input, the stage aligns to 112")
        self.model = model
        self.dim = int(model.output_shape[-1])

    def embed(self, faces: list[FaceCrop]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        bgr = [np.ascontiguousarray(f.aligned[:, :, ::-1]) for f in faces]
        return np.asarray(self.model.get_feat(bgr), dtype=np.float32).reshape(len(faces), -1)


class DlibEmbedder:
    """dlib ResNet v1 (128-d) with dlib's own 5-point alignment inside the detected box."""

    name = "dlib"
    dim = 128

    def __init__(self, weights: Path, shape_predictor: Path):
        import dlib

        try:
            self.predictor = dlib.shape_predictor(str(shape_predictor))
            self.model = dlib.face_recognition_model_v1(str(weights))
        except RuntimeError as exc:
            raise StageError(f"dlib model files {weights} / {shape_predictor} could not be loaded: {exc}") from exc
        self._dlib = dlib

    def chip(self, face: FaceCrop) -> np.ndarray:
        dlib = self._dlib
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        img = np.ascontiguousarray(face.image, dtype=np.uint8)
        shape = self.predictor(img, dlib.rectangle(x1, y1, x2, y2))
        return dlib.get_face_chip(img, shape, size=150, padding=0.25)

    def embed(self, faces: list[FaceCrop]) -> np.ndarray:
        if not faces:
            return np.zeros((0, self.dim), np.float32)
        chips = [self.chip(f) for f in faces]
        return np.asarray(self.model.compute_face_descriptor(chips), dtype=np.float32).reshape(len(faces), -1)


def onnx_providers(device: str) -> list[str]:
    """CUDA for onnxruntime when asked for (or 'auto') and available, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_gpu = device == "auto" or device.startswith("cuda")
    if wants_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise StageError(f"faces.device is {device!r} but onnxruntime has no CUDA provider: use 'auto' or 'cpu'")
    return ["CPUExecutionProvider"]


# -- the registry ------------------------------------------------------------------------------------------
# A factory gets the faces config, the embedder's resolved weights (None for "random", where allowed), the
# resolved paths of its extra weight files (by config field) and the inference backend the stage chose.
EmbedderFactory = Callable[["FacesConfig", "Path | None", "dict[str, Path]", str], Embedder]


@dataclass(frozen=True)
class EmbedderEntry:
    name: str
    factory: EmbedderFactory
    default_weights: str | None  # resolved through pipeline.weights when faces.embedder_model is unset
    thresholds: Mapping[str, float | int]  # clean thresholds (pipeline.config.EmbedderThresholds fields)
    extra_weights: tuple[str, ...] = ()  # FacesConfig fields naming more weight files (dlib's shape predictor)
    random_weights: bool = False  # faces.embedder_model "random" allowed (tests and benchmarks)
    module: str = field(default="", compare=False)


EMBEDDERS: Registry[EmbedderEntry] = Registry("face embedder")


def register_embedder(name: str, *, default_weights: str | None, thresholds: Mapping[str, float | int],
                      extra_weights: tuple[str, ...] = (), random_weights: bool = False
                      ) -> Callable[[EmbedderFactory], EmbedderFactory]:
    """Decorate a factory to make `faces.embedder: <name>` build it. The thresholds are checked now, so a bad
    entry fails where it is declared, not in the clean stage hours later."""
    EmbedderThresholds.model_validate(dict(thresholds))

    def add(factory: EmbedderFactory) -> EmbedderFactory:
        EMBEDDERS.add(name, EmbedderEntry(name, factory, default_weights, dict(thresholds), tuple(extra_weights),
                                          random_weights, factory.__module__))
        return factory

    return add


def embedder_entry(name: str) -> EmbedderEntry:
    return EMBEDDERS.entry(name)


@register_embedder("kprpe", default_weights="cvlface_adaface_vit_base_kprpe_webface12m.pt",
                   thresholds=_COSINE_PAPER, random_weights=True)
def _kprpe(cfg: FacesConfig, weights: Path | None, extras: dict[str, Path], backend: str) -> Embedder:
    return KPRPEEmbedder(weights, size=cfg.kprpe_size, device=cfg.device, num_threads=cfg.num_threads,
                         backend=backend)


@register_embedder("arcface", default_weights="w600k_r50.onnx", thresholds=_COSINE_PAPER)
def _arcface(cfg: FacesConfig, weights: Path | None, extras: dict[str, Path], backend: str) -> Embedder:
    # insightface's ArcFace runs on its own onnxruntime session whatever `backend` says
    if weights is None:
        raise StageError("the arcface embedder needs an ONNX path in faces.embedder_model")
    return ArcFaceEmbedder(weights, device=cfg.device, num_threads=cfg.num_threads)


@register_embedder("dlib", default_weights="dlib_face_recognition_resnet_model_v1.dat", thresholds=_DLIB,
                   extra_weights=("dlib_shape_predictor",))
def _dlib(cfg: FacesConfig, weights: Path | None, extras: dict[str, Path], backend: str) -> Embedder:
    if weights is None:
        raise StageError("the dlib embedder needs its ResNet .dat")
    return DlibEmbedder(weights, extras["dlib_shape_predictor"])
