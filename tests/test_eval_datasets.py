"""Evaluation sets from their folder layouts, shard splits, flip TTA and the report."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from sapiensid.config import SapiensIDConfig
from sapiensid.data import iter_raw
from sapiensid.data.synthetic import Identity, render, write_shards
from sapiensid.evaluate import (
    DatasetSpec,
    embed_items,
    evaluate_model,
    evaluate_webbody_shards,
    markdown_table,
    prepare_input,
    write_report,
)
from sapiensid.model import SapiensID
from sapiensid.reid_datasets import EvalItem, load_ltcc, load_market1501, load_prcc, webbody_query_gallery
from sapiensid.verification import write_bin


def _img(path, seed: int) -> None:
    img, _ = render(Identity.make(seed % 5), np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(cv2.resize(img, (64, 128)), cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SapiensID(SapiensIDConfig.preset("tiny")).eval()


def test_market1501_layout(tmp_path):
    for name in ["0001_c1s1_000151_01.jpg", "-1_c2s1_000001_00.jpg"]:
        _img(tmp_path / "query" / name, 1)
    for name in ["0001_c2s1_000301_02.jpg", "0000_c3s1_000001_00.jpg", "0002_c1s1_000001_00.jpg"]:
        _img(tmp_path / "bounding_box_test" / name, 2)
    (split,) = load_market1501(tmp_path)
    assert [(q.pid, q.camid) for q in split.query] == [(1, 0)]  # pid -1 junk dropped
    assert sorted((g.pid, g.camid) for g in split.gallery) == [(0, 2), (1, 1), (2, 0)]  # distractor kept
    (tmp_path / "query" / "bad.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="Market-1501 file name"):
        load_market1501(tmp_path)


def test_ltcc_clothes_ids(tmp_path):
    _img(tmp_path / "query" / "001_1_c11_015861.png", 1)
    _img(tmp_path / "test" / "001_1_c2_000001.png", 2)
    _img(tmp_path / "test" / "001_2_c3_000002.png", 3)
    _img(tmp_path / "test" / "002_1_c3_000002.png", 4)
    (split,) = load_ltcc(tmp_path)
    q = split.query[0]
    assert (q.pid, q.camid) == (1, 11)
    clothes = {g.item_id: g.clothes for g in split.gallery}
    assert clothes["test/001_1_c2_000001.png"] == q.clothes  # same pid, same outfit number
    assert clothes["test/001_2_c3_000002.png"] != q.clothes
    assert clothes["test/002_1_c3_000002.png"] != q.clothes  # outfit ids are per person
    assert split.protocols == ("general", "same_clothes", "clothes_changing")


def test_prcc_layout(tmp_path):
    base = tmp_path / "rgb" / "test"
    for cam in "ABC":
        for pid in ("3", "7"):
            _img(base / cam / pid / f"{cam}_{pid}.jpg", ord(cam) + int(pid))
    same, changing = load_prcc(tmp_path)
    assert {i.camid for i in same.query} == {1} and {i.camid for i in changing.query} == {2}
    assert {i.camid for i in same.gallery} == {0}
    g3 = next(i for i in same.gallery if i.pid == 3)
    assert next(i for i in same.query if i.pid == 3).clothes == g3.clothes
    assert next(i for i in changing.query if i.pid == 3).clothes != g3.clothes


def test_webbody_shard_split_and_report(tmp_path, tiny_model):
    paths = write_shards(tmp_path / "b", n_identities=4, per_identity=3, split="test", samples_per_shard=50)
    recs = [json.loads(r["json"]) for r in iter_raw(paths)]
    roles = webbody_query_gallery([r["class_id"] for r in recs], [r["key"] for r in recs], [r.get("role") for r in recs])
    assert len(roles.query) == 4 and len(roles.gallery) == 8
    assert {recs[i]["class_id"] for i in roles.query} == {0, 1, 2, 3}
    assert not set(roles.query) & set(roles.gallery)
    pairs = []
    for i in range(4):
        a, _ = render(Identity.make(i), np.random.default_rng(i))
        pairs.append(cv2.resize(a[100:300, 100:300], (112, 112)))
    write_bin(tmp_path / "lfw.bin", pairs * 10, np.array([True, False] * 10))
    results = evaluate_model(
        tiny_model,
        [DatasetSpec("wb", "webbody_shards", str(tmp_path / "b")), DatasetSpec("lfw", "verification_bin", str(tmp_path / "lfw.bin"))],
    )
    wb = results["wb"]["general"]
    assert wb["num_valid_query"] == 4 and 0 <= wb["top1"] <= 100 and wb["top20"] == 100.0
    assert results["lfw"]["verification"]["num_pairs"] == 20
    report = write_report(results, tmp_path / "rep", {"checkpoint": "x"})
    assert json.loads(report.json_path.read_text())["results"]["wb"]["general"]["top1"] == wb["top1"]
    table = report.markdown_path.read_text()
    assert "| wb | general |" in table and "| lfw |" in table
    assert markdown_table(results).count("\n") >= 5


def test_bundle_roles_take_precedence_over_the_fallback():
    labels, keys = [0, 0, 0, 1, 1, 2], ["a", "b", "c", "d", "e", "f"]
    roles = webbody_query_gallery(labels, keys, ["gallery", "query", "gallery", None, None, None])
    assert [keys[i] for i in roles.query if labels[i] == 0] == ["b"]
    assert sum(labels[i] == 1 for i in roles.query) == 1  # fallback: one query for an identity without roles
    assert roles.notes["identities_without_pair"] == 1 and 5 in roles.gallery  # a singleton is a distractor


@pytest.mark.slow
def test_streamed_evaluation_keeps_no_images(tmp_path, tiny_model):
    """Python-heap peak (numpy buffers are traced) while evaluating 24 vs 96 samples of 384 px: holding the
    decoded images would add 72 x 442 KB = 32 MB; streaming keeps one batch plus N x 128 floats."""
    import tracemalloc

    few = write_shards(tmp_path / "few", n_identities=6, per_identity=4, split="test", samples_per_shard=12)
    many = write_shards(tmp_path / "many", n_identities=6, per_identity=16, split="test", samples_per_shard=48)
    dev = torch.device("cpu")
    peaks = {}
    for name, urls in (("few", few), ("many", many)):
        tracemalloc.start()
        res = evaluate_webbody_shards(tiny_model, urls, dev, batch_size=16)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert res["num_query_images"] == 6 and res["skipped_samples"] == 0
    assert peaks["many"] - peaks["few"] < 15 << 20, peaks


def test_flip_tta_is_flip_invariant_and_batch_independent(tiny_model):
    img, fields = render(Identity.make(2), np.random.default_rng(9))
    from sapiensid.data import hflip_sample, keypoints22_from_meta

    pts = keypoints22_from_meta(fields)
    mirror, mirror_pts = hflip_sample(img, pts)
    items = [EvalItem(0, image=img, points=pts), EvalItem(0, image=mirror, points=mirror_pts)]
    dev = torch.device("cpu")
    alone = embed_items(tiny_model, items[:1], dev, batch_size=1)
    together = embed_items(tiny_model, items, dev, batch_size=2)
    assert np.allclose(alone[0], together[0], atol=1e-5)  # no dependence on batch neighbours
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # f(x) + f(flip x) is the same for an image and its mirror (keypoints mirrored with it).
    assert np.allclose(together[0], together[1], atol=1e-4)
    im, mask, k = prepare_input(img[:, :200], pts, 96)
    assert im.shape == (96, 96, 3) and mask.shape == (96, 96) and k.shape == (22, 2)


@pytest.mark.realmodel
def test_pose_keypoints_for_folder_images():
    from flows.train import pose_keypoint_fn
    from pipeline.assets import asset_path

    img = cv2.cvtColor(cv2.imread(str(asset_path("zidane.jpg"))), cv2.COLOR_BGR2RGB)
    pts = pose_keypoint_fn("asset:yolo11n-pose.pt")(img)
    valid = (pts[:17] >= 0).all(axis=1)
    assert valid.sum() >= 8  # a real person, most joints visible
    assert (pts[:17][valid, 0] <= img.shape[1]).all() and (pts[:17][valid, 1] <= img.shape[0]).all()
    assert (pts[17:] == -1).all()
