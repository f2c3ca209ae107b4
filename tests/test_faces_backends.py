"""The faces stage's inference backends: the RetinaFace detector (real mnet0.25 ONNX) on OpenVINO finds the same
faces as on ONNX Runtime, KP-RPE compiled from its weight file gives the torch model's features, the stage's
rows agree across backends, and a crafted pickle named as KP-RPE weights is refused with no side effect."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from pipeline.assets import asset_path
from pipeline.config import FacesConfig
from pipeline.faces import FacesStage, decode_feature
from pipeline.faces.detectors import FaceDetector
from pipeline.faces.embedders import KPRPEEmbedder
from pipeline.inference import installed_backends
from pipeline.stage import StageError
from sapiensid.kprpe_face import build_kprpe_face_vit
from schemas.persons import PERSONS
from tests.faces_support import load_rgb, person_row
from tests.test_faces_stage import TINY, aligned_faces

COMPILED = [b for b in installed_backends() if b != "torch"]
PHOTOS = ("obama.jpg", "obama2.jpg", "biden.jpg", "astronaut.png", "grace_hopper.jpg", "t1.jpg", "solvay.jpg")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {p: load_rgb(p, width=640) for p in PHOTOS}


@pytest.mark.slow
@pytest.mark.skipif("openvino" not in COMPILED, reason="openvino is not installed")
def test_detector_on_openvino_matches_onnxruntime(photos):
    path = asset_path("retinaface_mnet025.onnx")
    ort_det = FaceDetector(path, num_threads=2)
    ov_det = FaceDetector(path, num_threads=2, backend="openvino")
    assert ov_det.layout == ort_det.layout == "biubug6" and ov_det.fixed_size == ort_det.fixed_size
    n = 0
    for native in (True, False):  # whole photos at their size (group photos), then the stage's 160 canvases
        a = ort_det.detect_batch(list(photos.values()), max_faces=None, score_threshold=0.5, native=native)
        b = ov_det.detect_batch(list(photos.values()), max_faces=None, score_threshold=0.5, native=native)
        for da, db in zip(a, b, strict=True):
            assert len(da) == len(db)
            for x, y in zip(da, db):
                assert iou(x.box, y.box) >= 0.99 and np.abs(x.landmarks - y.landmarks).max() <= 1.0
                assert abs(x.score - y.score) < 1e-3
                n += 1
    assert n >= 40  # the Solvay photo alone holds 29 faces


@pytest.fixture(scope="module")
def kprpe_weights(tmp_path_factory) -> pathlib.Path:
    """A tiny KP-RPE weight file whose keypoint path is live (the init's zero linear would ignore landmarks)."""
    torch.manual_seed(3)
    model = build_kprpe_face_vit("tiny")
    model.net.keypoint_linear.weight.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("kprpe") / "kprpe_tiny.pt"
    torch.save(model.state_dict(), path)  # the released layout: net.* keys
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILED)
def test_kprpe_compiled_features_match_torch(backend, kprpe_weights, photos):
    detector = FaceDetector(asset_path("retinaface_mnet025.onnx"), num_threads=1)
    faces = aligned_faces({p: photos[p] for p in PHOTOS[:5]}, detector)
    want = KPRPEEmbedder(kprpe_weights, size="tiny", device="cpu").embed(faces)
    compiled = KPRPEEmbedder(kprpe_weights, size="tiny", device="cpu", backend=backend)
    got = compiled.embed(faces)
    assert compiled.model is None and got.shape == want.shape == (5, 64)
    assert cosine(got, want).min() >= 0.999
    assert np.allclose(np.concatenate([compiled.embed([f]) for f in faces]), got, atol=1e-4)  # batch-independent
    # Exported once beside the weights, keyed by their checksum, and reused.
    exported = sorted((kprpe_weights.parent / "exported").rglob("kprpe-tiny-*.onnx"))
    assert len(exported) == 1


@pytest.mark.parametrize("backend", COMPILED)
def test_stage_rows_agree_across_backends(backend, photos):
    rows = PERSONS.from_rows([person_row(p.split(".")[0], photos[p]) for p in PHOTOS[:5]])
    out = {}
    for b in ("torch", backend):
        stage = FacesStage(FacesConfig(**TINY, backend=b))
        out[b] = stage.process(rows).table.to_pylist()
        assert stage.config_hash() != FacesStage(FacesConfig(**TINY, backend="torch")).config_hash() or b == "torch"
    a, c = out["torch"], out[backend]
    assert [r["person_id"] for r in a] == [r["person_id"] for r in c] and len(a) >= 4
    fa = np.stack([decode_feature(r["feature"], r["feature_dim"]) for r in a])
    fc = np.stack([decode_feature(r["feature"], r["feature_dim"]) for r in c])
    assert cosine(fa, fc).min() >= 0.999
    assert np.abs(np.array([r["face_box"] for r in a]) - np.array([r["face_box"] for r in c])).max() <= 1.0


class _Payload:
    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.target, "pwned"))


@pytest.mark.parametrize("backend", ["torch", *COMPILED])
def test_crafted_pickle_kprpe_weights_refused_and_run_nothing(tmp_path, backend):
    marker = tmp_path / "pwned"
    evil = tmp_path / "kprpe.pt"
    torch.save({"net.norm.weight": torch.zeros(64), "x": _Payload(marker)}, evil)
    stage = FacesStage(FacesConfig(**{**TINY, "embedder_model": str(evil), "backend": backend}))
    with pytest.raises(StageError, match="weights-only"):
        stage.setup()
    assert not marker.exists(), "loading the KP-RPE weights executed code"
    assert not (tmp_path / "exported").exists() or not list((tmp_path / "exported").rglob("*.onnx"))
