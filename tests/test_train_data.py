"""WebDataset shard loading for training: decoding, the 22 keypoints, masks, augmentation, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from sapiensid.data import (
    AugmentConfig,
    BatchPlan,
    StreamLoader,
    StreamSpec,
    augment,
    decode_sample,
    expand_urls,
    foreground_mask_white,
    hflip_sample,
    iter_decoded,
    iter_raw,
    keypoints22_from_meta,
)
from sapiensid.data.synthetic import write_shards
from sapiensid.masking import keep_count_for_batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(out, n_identities=6, per_identity=5, samples_per_shard=8)
    return out, paths


def test_expand_and_decode(shards):
    out, paths = shards
    assert expand_urls(out, split="train") == paths
    assert expand_urls(str(out / "webbody-train-{000000..000001}.tar")) == paths[:2]
    samples = list(iter_decoded(paths))
    assert len(samples) == 30
    s = samples[0]
    assert s.image.shape == (384, 384, 3) and s.image.dtype == np.uint8
    assert s.points.shape == (22, 2)
    assert sorted({x.class_id for x in samples}) == list(range(6))


def test_keypoints22_layout():
    meta = {
        "keypoints": [[10.0 * i, 20.0, 0.9] for i in range(17)],
        "face_landmarks": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]],
    }
    meta["keypoints"][3][2] = 0.2  # invisible
    pts = keypoints22_from_meta(meta)
    assert pts[0].tolist() == [0.0, 20.0] and pts[16].tolist() == [160.0, 20.0]
    assert pts[3].tolist() == [-1, -1]
    assert pts[17].tolist() == [1, 2] and pts[21].tolist() == [9, 10]
    meta["face_landmarks"] = None
    assert (keypoints22_from_meta(meta)[17:] == -1).all()


def test_foreground_mask_from_white_padding():
    img = np.full((40, 30, 3), 255, np.uint8)
    img[5:20, 8:12] = 90
    img[30, 25] = 0  # a lone dark pixel still widens the rectangle (rows/cols rule)
    mask = foreground_mask_white(img)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    # Row 30's mean is 3*(29*255)/30/255 = 2.9 < 2.97, so it counts as content; column 25 the same.
    assert rows[0] == 5 and rows[-1] == 30 and cols[0] == 8 and cols[-1] == 25
    assert foreground_mask_white(np.full((8, 8, 3), 255, np.uint8)).all()


def test_augment_moves_keypoints_with_pixels():
    img = np.full((384, 384, 3), 255, np.uint8)
    img[100:300, 120:260] = 128
    pts = np.full((22, 2), -1.0, np.float32)
    pts[5] = (150, 150)  # left shoulder -> red dot
    pts[6] = (230, 150)  # right shoulder -> blue dot
    img[146:155, 146:155] = (255, 0, 0)
    img[146:155, 226:235] = (0, 0, 255)
    for flip in (0.0, 1.0):
        cfg = AugmentConfig(color_prob=0, crop_prob=0, blur_prob=0, rotate_prob=1.0, flip_prob=flip)
        # A mirrored image shows the person's left shoulder where the blue (right) dot was drawn.
        channels = ((5, 2), (6, 0)) if flip else ((5, 0), (6, 2))
        for seed in range(5):
            out, p = augment(img, pts, 96, np.random.default_rng(seed), cfg)
            assert out.shape == (96, 96, 3)
            for idx, channel in channels:
                assert (p[idx] >= 0).all()
                x, y = np.round(p[idx]).astype(int)
                px = out[np.clip(y, 0, 95), np.clip(x, 0, 95)].astype(int)
                assert px[channel] > 150 and px.sum() - px[channel] < 200, (flip, seed, idx, px)


def test_hflip_swaps_left_right():
    img = np.zeros((10, 20, 3), np.uint8)
    pts = np.full((22, 2), -1.0, np.float32)
    pts[5] = (15, 3)
    pts[17] = (4, 2)
    out, p = hflip_sample(img, pts)
    assert p[6].tolist() == [5, 3] and (p[5] == -1).all()
    assert p[18].tolist() == [16, 2]


def _spec(paths, **kw):
    base = dict(urls=paths, image_size=64, plan=BatchPlan(batch_size=4), shuffle_buffer=6, seed=3, num_classes=6)
    base.update(kw)
    return StreamSpec(**base)


def test_one_epoch_covers_every_sample_once(shards):
    _, paths = shards
    loader = StreamLoader(_spec(paths, augment=None), workers=0)
    labels = []
    for batch in loader:
        labels.extend(batch["labels"].tolist())
        if batch["position"][0] > 0:  # rolled into epoch 1
            labels = labels[: 30]
            break
    assert sorted(labels) == sorted(i for i in range(6) for _ in range(5))
    b = next(loader)
    assert b["images"].shape == (4, 64, 64, 3) and b["masks"].shape == (4, 64, 64)
    assert b["ldmks"].shape == (4, 22, 2) and b["masks"].dtype == torch.bool


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches(shards, workers):
    _, paths = shards
    spec = _spec(paths, plan=BatchPlan(batch_size=4, keep_tokens=100, variable=(200, 60, 2.0), max_batch_size=9, seed=1))
    full = StreamLoader(spec, workers=workers)
    ref = [next(full) for _ in range(14)]  # > 1 epoch per stream
    first = StreamLoader(spec, workers=workers)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
    resumed = StreamLoader(spec, workers=workers)
    resumed.load_state_dict(state)
    for expect in ref[5:]:
        got = next(resumed)
        assert got["step"] == expect["step"] and got["n_keep"] == expect["n_keep"]
        assert torch.equal(got["images"], expect["images"]) and torch.equal(got["labels"], expect["labels"])
        assert torch.equal(got["ldmks"], expect["ldmks"])
    with pytest.raises(ValueError, match="same data.num_workers"):
        StreamLoader(spec, workers=workers + 3).load_state_dict(state)


def test_variable_keep_batches_follow_the_memory_rule():
    plan = BatchPlan(batch_size=32, keep_tokens=146, variable=(432, 60, 3.0), max_batch_size=400, seed=0)
    sizes = [plan.for_step(t) for t in range(200)]
    keeps = [k for _, k in sizes]
    assert len(set(keeps)) > 20 and min(keeps) >= 60 and max(keeps) <= 432
    for b, k in sizes:
        # keep^2 * batch is held at 146^2 * 32: the keep count the model's rule gives this batch is ~k.
        if b < 400:
            assert abs(b - 32 * (146 / k) ** 2) <= 0.5 + 1e-9
        if 20 <= b < 400:  # rounding of b aside, the model's inverse rule gives back k
            assert abs(keep_count_for_batch(146, 32, b) - k) <= 0.05 * k
    assert plan.for_step(7) == plan.for_step(7)
    assert BatchPlan(batch_size=8, keep_tokens=None).for_step(3) == (8, None)


def test_bad_samples_are_counted_and_skipped(tmp_path, shards):
    _, paths = shards
    raw = list(iter_raw(paths[:1]))
    bad = tmp_path / "webbody-train-000000.tar"
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "broken", "jpg": b"not a jpeg", "json": raw[0]["json"]})
        for r in raw:
            w.write({"__key__": r["__key__"], "jpg": r["jpg"], "json": r["json"]})
        w.write({"__key__": "nojson", "jpg": raw[0]["jpg"], "json": b"{"})
    loader = StreamLoader(_spec([str(bad)], shuffle_buffer=1, augment=None), workers=0)
    got = [next(loader) for _ in range(2)]
    assert loader.skipped >= 1 and sum(len(b["labels"]) for b in got) == 8
    with pytest.raises(Exception, match="image does not decode"):
        decode_sample({"__key__": "broken", "jpg": b"x", "json": raw[0]["json"]})


def test_pipe_and_fsspec_urls(shards):
    import fsspec

    _, paths = shards
    n = sum(1 for _ in iter_raw(paths[:1]))
    assert sum(1 for _ in iter_raw([f"pipe:cat {paths[0]}"])) == n
    fs = fsspec.filesystem("memory")
    with open(paths[0], "rb") as f:
        fs.pipe("/webbody/webbody-train-000000.tar", f.read())
    assert sum(1 for _ in iter_raw(["memory://webbody/webbody-train-000000.tar"])) == n
