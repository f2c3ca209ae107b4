"""The same shards read identically through webdataset, Ray Data `read_webdataset` and HF `datasets`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.bundle import run
from tests.bundle_support import make_build, small_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    run(small_config(), make_build(root, n_ids=5, per_id=4), root / "bundle")
    return sorted(str(p) for p in (root / "bundle").glob("webbody-*.tar")), root


def _by_webdataset(files: list[str]) -> dict[str, dict]:
    import webdataset as wds

    out = {}
    for s in wds.WebDataset(files, shardshuffle=False, empty_check=False):
        out[s["__key__"]] = {"jpg": s["jpg"], "json": json.loads(s["json"]), "npy": s["face.npy"]}
    return out


@pytest.mark.slow  # Ray Data + HF datasets start-up: ~40 s on 2 cores
def test_three_readers_agree(shards, ray_local):
    files, root = shards
    ref = _by_webdataset(files)
    assert len(ref) == 20

    import ray.data

    ray_rows = ray.data.read_webdataset(files, decoder=None).take_all()
    assert {r["__key__"] for r in ray_rows} == set(ref)
    for r in ray_rows:
        want = ref[r["__key__"]]
        assert r["jpg"] == want["jpg"] and json.loads(r["json"]) == want["json"] and r["face.npy"] == want["npy"]

    from datasets import load_dataset

    hf = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(root / "hf"))
    assert len(hf) == len(ref)
    for row in hf:
        want = ref[row["__key__"]]
        pixels = np.asarray(Image.open(io.BytesIO(want["jpg"])).convert("RGB"))
        assert np.array_equal(np.asarray(row["jpg"].convert("RGB")), pixels)
        assert row["json"] == want["json"]
        assert np.array_equal(np.asarray(row["face.npy"]), np.load(io.BytesIO(want["npy"])))


def test_training_loader_reads_the_shards(shards):
    """The training side's decoder (sapiensid.data.shards) accepts every bundled sample."""
    from sapiensid.data.shards import decode_sample, iter_raw

    files, _ = shards
    decoded = [decode_sample(raw) for raw in iter_raw(files)]
    assert len(decoded) == 20
    assert all(d.image.shape == (384, 384, 3) and d.points.shape == (22, 2) for d in decoded)
