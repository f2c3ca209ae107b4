"""Clean on real photos through the real query, download (img2dataset from loopback), persons (YOLO11n-pose)
and faces (RetinaFace-mnet0.25 + dlib) stages: a name whose URLs hold the three Obama photos plus other
people keeps exactly the Obama images, a validation set built from one Obama photo removes him, and one-image
validation centers of other people (dlib scores strangers high) leave him."""

from __future__ import annotations

import pytest

from pipeline import registry
from pipeline.assets import asset_path
from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir
from pipeline.valsets import build_valset_centers
from tests.realchain_support import build_real_chain

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")
OTHERS = ("biden.jpg", "zidane.jpg", "astronaut.png", "grace_hopper.jpg")


def test_obama_name_keeps_obama_and_a_valset_removes_him(tmp_path):
    photos = [(p, "Barack_Obama", asset_path(p).read_bytes()) for p in OBAMA + OTHERS]
    raw = build_real_chain(tmp_path, photos, shard_size=4, until="clean")

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

    # One-image centers of other people: dlib's cosines put strangers near him (up to ~0.88), so only the
    # scale-aware one-image cut (pipeline/faces/embedders.py, _DLIB) keeps him.
    others = tmp_path / "others"
    for p in ("biden.jpg", "zidane.jpg", "grace_hopper.jpg"):
        (others / p.split(".")[0]).mkdir(parents=True)
        (others / p.split(".")[0] / p).write_bytes(asset_path(p).read_bytes())
    report = build_valset_centers("cfp_fp", others, tmp_path / "others.parquet", cfg.faces)
    assert report["centers"] == 3
    cfg = BuildConfig.model_validate({**raw, "clean": {"valsets": [str(tmp_path / "others.parquet")]}})
    stats = registry.run_stage("clean", cfg, {"faces": build / "faces", "persons": build / "persons"},
                                tmp_path / "clean_others")
    assert stats["identities"] == 1 and stats["steps"]["val_overlap"]["cfp_fp"]["identities"] == 0
    assert stats["steps"]["val_overlap"]["cfp_fp"]["matched"] == 0
