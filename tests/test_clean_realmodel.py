"""Clean on real photos through the real query, download (img2dataset from loopback), persons (YOLO11n-pose)
and faces (RetinaFace-mnet0.25 + dlib) stages: a name whose URLs hold the three Obama photos plus other
people keeps exactly the Obama images, and a validation set built from one Obama photo removes him."""

from __future__ import annotations

import pytest
import yaml

from flows.build import build_plain
from pipeline import registry
from pipeline.assets import asset_path
from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir
from pipeline.valsets import build_valset_centers
from tests.servers import Route, serve

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")
OTHERS = ("biden.jpg", "zidane.jpg", "astronaut.png", "grace_hopper.jpg")


def test_obama_name_keeps_obama_and_a_valset_removes_him(tmp_path):
    routes = {f"/{p}": Route(200, {"Content-Type": "image/png" if p.endswith("png") else "image/jpeg"},
                             asset_path(p).read_bytes()) for p in OBAMA + OTHERS}
    faces_cfg = {"detector_model": str(asset_path("retinaface_mnet025.onnx")), "embedder": "dlib",
                 "embedder_model": str(asset_path("dlib_face_recognition_resnet_model_v1.dat")),
                 "dlib_shape_predictor": str(asset_path("shape_predictor_5_face_landmarks.dat"))}
    with serve(routes) as base:
        lines = [f"{i} Barack_Obama {base}/{p}" for i, p in enumerate(OBAMA + OTHERS)]
        (tmp_path / "url.lst").write_text("\n".join(lines) + "\n")
        raw = {
            "run": {"executor": "local"},
            "query": {"inputs": [{"path": str(tmp_path / "url.lst"), "format": "url_lst"}], "shard_size": 4},
            "download": {"allow_private_hosts": ["127.0.0.1"], "timeout": 5, "retries": 0, "processes_count": 1},
            "persons": {"model": str(asset_path("yolo11n-pose.pt")), "batch_size": 8},
            "faces": faces_cfg,
        }
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
        build_plain(config_path=str(tmp_path / "cfg.yaml"), output=str(tmp_path / "build"), until="clean")

    build = tmp_path / "build"
    sel = [r for _, t in DatasetDir(build / "clean").iter_tables() for r in t.to_pylist()]
    urls = {r["sample_id"]: r["url"] for _, t in DatasetDir(build / "query").iter_tables() for r in t.to_pylist()}
    kept = {urls[r["sample_id"]].rsplit("/", 1)[1] for r in sel if r["kept"]}
    assert kept == set(OBAMA), [(urls[r["sample_id"]], r["detection_index"], r["reason"]) for r in sel]
    assert sum(r["kept"] for r in sel) == 3 and {r["identity"] for r in sel if r["kept"]} == {"Barack_Obama"}

    # A validation set made from one of those photos (an identity folder) removes the identity.
    folder = tmp_path / "lfw" / "Barack_Obama"
    folder.mkdir(parents=True)
    (folder / "obama2.jpg").write_bytes(asset_path("obama2.jpg").read_bytes())
    cfg = BuildConfig.model_validate(raw)
    report = build_valset_centers("lfw", tmp_path / "lfw", tmp_path / "lfw.parquet", cfg.faces)
    assert report["centers"] == 1
    cfg = BuildConfig.model_validate({**raw, "clean": {"valsets": [str(tmp_path / "lfw.parquet")]}})
    stats = registry.run_stage("clean", cfg, {"faces": build / "faces", "persons": build / "persons"},
                                tmp_path / "clean_val")
    assert stats["identities"] == 0
    assert stats["steps"]["val_overlap"]["lfw"]["identities"] == 1
    assert stats["drops"]["val_overlap:lfw"] == 3
