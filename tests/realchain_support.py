"""The real-model build the clean tests on real photos share: photos served from loopback, then the real
query, download (img2dataset), persons (YOLO11n-pose) and faces (RetinaFace-mnet0.25 + dlib) stages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.build import build_plain
from pipeline.assets import asset_path
from tests.servers import Route, serve


def build_real_chain(tmp_path: Path, photos: Sequence[tuple[str, str, bytes]], shard_size: int,
                     until: str) -> dict[str, Any]:
    """Serve `photos` (file name, source label, encoded bytes) and build them into `tmp_path/build` up to
    stage `until` (url list and config in `tmp_path`). Returns the raw config, for stages run afterwards."""
    faces_cfg = {"detector_model": str(asset_path("retinaface_mnet025.onnx")), "embedder": "dlib",
                 "embedder_model": str(asset_path("dlib_face_recognition_resnet_model_v1.dat")),
                 "dlib_shape_predictor": str(asset_path("shape_predictor_5_face_landmarks.dat"))}
    routes = {f"/{name}": Route(200, {"Content-Type": "image/png" if name.endswith("png") else "image/jpeg"}, data)
              for name, _, data in photos}
    with serve(routes) as base:
        lines = [f"{i} {label} {base}/{name}" for i, (name, label, _) in enumerate(photos)]
        (tmp_path / "url.lst").write_text("\n".join(lines) + "\n")
        raw = {
            "run": {"executor": "local"},
            "query": {"inputs": [{"path": str(tmp_path / "url.lst"), "format": "url_lst"}],
                      "shard_size": shard_size},
            "download": {"allow_private_hosts": ["127.0.0.1"], "timeout": 5, "retries": 0, "processes_count": 1},
            "persons": {"model": str(asset_path("yolo11n-pose.pt")), "batch_size": 8},
            "faces": faces_cfg,
        }
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
        build_plain(config_path=str(tmp_path / "cfg.yaml"), output=str(tmp_path / "build"), until=until)
    return raw
