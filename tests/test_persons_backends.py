"""The persons stage's inference backends and its safe model loading, with the real YOLO11n-pose checkpoint.

- every installed compiled backend finds the same persons as Ultralytics `predict` on the real photos of
  `pipeline.assets` (same count, box IoU >= 0.99, keypoints within 1 px), both on the download stage's 640
  canvases (what the stage sees) and on the photos at their own sizes;
- the exported graph is cached by the checkpoint's checksum and reused; the backend is in the config hash;
- a crafted pickle named as the pose model is refused before any of its code runs.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from pipeline.assets import PHOTOS, asset_path
from pipeline.config import PersonsConfig
from pipeline.inference import (
    CompiledPose,
    choose_backend,
    export_dir,
    installed_backends,
    ultralytics_detections,
)
from pipeline.persons import PersonsStage, load_pose_model, yolo_pose_onnx
from pipeline.stage import StageError
from schemas.tables import DOWNLOAD
from tests.test_persons import download_row

pytestmark = pytest.mark.realmodel
COMPILED = [b for b in installed_backends() if b != "torch"]
CONF, IOU, MAX_DET = 0.25, 0.7, 30  # Ultralytics' defaults, more persons than the stage keeps: a harder match


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x2, y2 = np.minimum(a[:, 2], b[:, 2]), np.minimum(a[:, 3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def weights() -> str:
    return str(asset_path("yolo11n-pose.pt"))


@pytest.fixture(scope="module")
def reference(weights):
    model = load_pose_model(weights)
    model.predict([np.full((64, 64, 3), 255, np.uint8)], verbose=False, device="cpu")
    return model


def canvases() -> list[np.ndarray]:
    return [cv2.imdecode(np.frombuffer(download_row(p, p)["image"], np.uint8), cv2.IMREAD_COLOR) for p in PHOTOS]


def photos() -> list[np.ndarray]:
    return [cv2.imread(str(asset_path(p)), cv2.IMREAD_COLOR) for p in PHOTOS]


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_backend_matches_ultralytics_predict(backend, weights, reference):
    compiled = CompiledPose(yolo_pose_onnx(weights, 640), backend, 640, threads=2)
    checked = 0
    # Canvases as one batch (the stage's case), then each real photo alone at its own size.
    for batch in [canvases()] + [[p] for p in photos()]:
        want = ultralytics_detections(reference.predict(batch, imgsz=640, conf=CONF, iou=IOU, max_det=MAX_DET,
                                                        verbose=False, device="cpu"))
        got = compiled.predict(batch, conf=CONF, iou=IOU, max_det=MAX_DET)
        for w, g in zip(want, got, strict=True):
            assert len(g.conf) == len(w.conf)
            if not len(w.conf):
                continue
            assert box_iou(w.xyxy, g.xyxy).min() >= 0.99
            assert np.abs(w.keypoints[..., :2] - g.keypoints[..., :2]).max() <= 1.0
            assert np.abs(w.conf - g.conf).max() < 1e-3 and np.abs(w.keypoints[..., 2] - g.keypoints[..., 2]).max() < 1e-3
            checked += len(w.conf)
    assert checked >= 40  # the photos hold dozens of people (29 in the Solvay photo alone)


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILED)
def test_stage_rows_match_between_torch_and_backend(backend):
    rows = [download_row(p, p) for p in ("bus.jpg", "zidane.jpg", "t1.jpg")]
    batch = DOWNLOAD.from_rows(rows)
    tables = {}
    for b in ("torch", backend):
        stage = PersonsStage(PersonsConfig(model="asset:yolo11n-pose.pt", backend=b, threads=2))
        stage.ensure_setup()
        tables[b] = stage.process(batch).table
    a, b = tables["torch"], tables[backend]
    assert a.column("person_id").to_pylist() == b.column("person_id").to_pylist() and a.num_rows >= 8
    assert np.abs(np.array(a.column("keypoints").to_pylist()) - np.array(b.column("keypoints").to_pylist())).max() <= 1


def test_export_is_cached_by_checksum(tmp_path, weights):
    first = yolo_pose_onnx(weights, 640)
    stamp = first.stat().st_mtime_ns
    assert yolo_pose_onnx(weights, 640) == first and first.stat().st_mtime_ns == stamp  # reused, not redone
    assert first.parent.parent.name == "exported" and first.parent.parent.parent == pathlib.Path(weights).parent
    # The folder is named by the checkpoint's bytes: a changed checkpoint never finds a stale graph.
    a, b = tmp_path / "a" / "pose.pt", tmp_path / "b" / "pose.pt"
    for path, data in ((a, b"one"), (b, b"two")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert export_dir(a).name != export_dir(b).name and export_dir(a).parent == a.parent / "exported"
    shutil.copyfile(weights, a)
    assert export_dir(a).name.rsplit("-", 1)[1] == first.parent.name.rsplit("-", 1)[1]


def test_backend_is_part_of_the_config_hash():
    hashes = {b: PersonsStage(PersonsConfig(backend=b)).config_hash() for b in installed_backends()}
    assert len(set(hashes.values())) == len(hashes)
    assert PersonsStage(PersonsConfig(backend="auto")).config_hash() == hashes[choose_backend("auto")]
    with pytest.raises(StageError, match="not understood"):
        choose_backend("tensorflow")


def test_openvino_backend_sends_no_telemetry(weights, tmp_path):
    if "openvino" not in installed_backends():
        pytest.skip("openvino is not installed")
    # A fresh process (this one may have imported openvino already): export an IR, run it, then check that
    # openvino's telemetry is its no-op stub and the real package never loaded.
    onnx_copy = tmp_path / "pose.onnx"
    shutil.copyfile(yolo_pose_onnx(weights, 640), onnx_copy)
    code = f"""
import sys
import numpy as np
from pipeline.inference import OpenVINORunner, openvino_ir
runner = OpenVINORunner(openvino_ir({str(onnx_copy)!r}), threads=1)
assert runner(np.zeros((1, 3, 64, 64), np.float32))[0].shape[:2] == (1, 56)
import openvino.tools.ovc.telemetry_utils as tu
assert sys.modules.get("openvino_telemetry") is None, "openvino_telemetry was imported"
assert tu.tm.__name__.endswith("telemetry_stub"), tu.tm.__name__
print("telemetry off")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and "telemetry off" in out.stdout, out.stderr[-2000:]


class _Payload:
    """Unpickling this object writes a file: the side effect a crafted checkpoint would have."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.target, "pwned"))


def test_crafted_pickle_pose_model_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-pose.pt"
    torch.save({"model": _Payload(marker), "train_args": {}}, evil)
    with pytest.raises(StageError, match="weights-only"):
        load_pose_model(str(evil))
    assert not marker.exists(), "loading the pose model executed code"
    # The stage refuses it the same way, before any row.
    with pytest.raises(StageError, match="weights-only"):
        PersonsStage(PersonsConfig(model=str(evil), backend="torch")).setup()
    if COMPILED:  # and an export never unpickles it either
        with pytest.raises(StageError, match="weights-only"):
            yolo_pose_onnx(evil, 640)
    assert not marker.exists()
    # Guard: the payload is real (plain torch.load, as Ultralytics' default loader does, runs it).
    torch.load(evil, weights_only=False)  # noqa: S614 - deliberate, on our own file
    assert marker.read_text() == "pwned"
    os.remove(marker)
