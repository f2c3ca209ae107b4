"""`webbody models export`: the persons and faces graphs made ahead of a run, then found in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from pipeline.assets import asset_path

pytestmark = pytest.mark.slow


def test_models_export_then_cached(capsys):
    args = ["models", "export", "--backend", "onnxruntime", "--set", f"persons.model={asset_path('yolo11n-pose.pt')}",
            "--set", "faces.detector_model=retinaface_mnet025.onnx", "--set", "faces.embedder_model=random",
            "--set", "faces.kprpe_size=tiny"]
    assert main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["stage"], r["backend"]) for r in first] == [("persons", "onnxruntime"), ("faces", "onnxruntime")]
    graphs = [Path(r["graph"]) for r in first]
    stamps = [g.stat().st_mtime_ns for g in graphs]
    assert all(g.suffix == ".onnx" and g.stat().st_size > 0 for g in graphs)
    assert main(args) == 0  # again: the same files, not exported a second time
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [Path(r["graph"]) for r in again] == graphs and [g.stat().st_mtime_ns for g in graphs] == stamps
    assert main(["models", "export", "--set", "faces.embedder=nope"]) == 2  # a clear error, not a traceback
