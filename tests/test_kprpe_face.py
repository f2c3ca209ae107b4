"""CVLface ViT KP-RPE face model: strict loading of both checkpoint layouts, shapes, batch consistency,
and the relative-keypoint convention."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from sapiensid.kprpe_face import (
    CheckpointMismatchError,
    build_kprpe_face_vit,
    load_kprpe_face_weights,
    relative_keypoints,
)
from tests.model_helpers import CVLFACE_MANIFEST, load_manifest, signature, synth_state

# ArcFace 112x112 template, normalised: the landmark layout the model sees on aligned faces
TEMPLATE = torch.tensor([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) / 112


@pytest.fixture(scope="module")
def base_and_state():
    manifest = load_manifest(CVLFACE_MANIFEST)
    model = build_kprpe_face_vit("base")
    return model, synth_state(manifest), manifest


def test_base_state_dict_equals_manifest(base_and_state):
    model, _, manifest = base_and_state
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, m["shape"]) for k, m in manifest["state_dict"].items()]
    assert signature(sd) == manifest["signature_sha256"]
    assert sum(p.numel() for p in model.parameters()) == manifest["counts"]["num_parameters"]


def test_strict_load_both_layouts(base_and_state, tmp_path):
    model, state, _ = base_and_state
    pt = tmp_path / "model.pt"
    torch.save(state, pt)  # pretrained_model/model.pt layout: net.*
    load_kprpe_face_weights(model, pt)
    assert torch.equal(model.state_dict()["net.keypoint_linear.weight"], state["net.keypoint_linear.weight"])

    shifted = {f"model.{k}": v + 1 if v.is_floating_point() else v for k, v in state.items()}
    st = tmp_path / "model.safetensors"
    save_file(shifted, str(st), metadata={"format": "pt"})  # HF root layout: model.net.*
    load_kprpe_face_weights(model, st)
    assert torch.equal(model.state_dict()["net.blocks.3.attn.qkv.weight"], shifted["model.net.blocks.3.attn.qkv.weight"])

    model.eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    out = model(x, TEMPLATE.expand(2, -1, -1))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_mismatch_names_the_keys(tmp_path):
    model = build_kprpe_face_vit("tiny")
    state = model.state_dict()
    bad = dict(state)
    del bad["net.norm.weight"]
    bad["net.extra.weight"] = torch.zeros(3)
    bad["net.pos_embed"] = torch.zeros(1, 10, 64)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_kprpe_face_weights(model, path)
    msg = str(err.value)
    assert "net.norm.weight" in msg and "net.extra.weight" in msg and "net.pos_embed" in msg
    assert isinstance(err.value, ValueError)
    assert err.value.missing == ["net.norm.weight"] and err.value.unexpected == ["net.extra.weight"]


def test_unsafe_pickle_refused(tmp_path):
    model = build_kprpe_face_vit("tiny")
    path = tmp_path / "pickle.pt"
    # an arbitrary class in the pickle: weights_only loading must refuse it
    torch.save({"net.norm.weight": torch.zeros(64), "obj": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError):
        load_kprpe_face_weights(model, path)


def test_batch_equals_one_by_one():
    torch.manual_seed(0)
    model = build_kprpe_face_vit("tiny")
    # non-zero KP-RPE so the keypoints matter in this check
    torch.nn.init.normal_(model.net.keypoint_linear.weight, std=0.5)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    kps = TEMPLATE + torch.randn(4, 5, 2) * 0.03
    with torch.no_grad():
        batch = model(x, kps)
        single = torch.cat([model(x[i : i + 1], kps[i : i + 1]) for i in range(4)])
    assert batch.shape == (4, model.output_dim)
    assert torch.allclose(batch, single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        moved = model(x, kps + 0.05)
    assert (moved - batch).abs().max() > 1e-4  # keypoints change the features through KP-RPE


def test_relative_keypoint_convention():
    kps = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8], [0.9, 0.05]]])
    rel = relative_keypoints(kps, 14)
    assert rel.shape == (1, 196, 10)
    row, col = 2, 5  # row-major patch order; centre is ((col+0.5)/14, (row+0.5)/14) as (x, y)
    cx, cy = (col + 0.5) / 14, (row + 0.5) / 14
    expected = torch.tensor([[cx - kx, cy - ky] for kx, ky in kps[0].tolist()]).flatten()
    assert torch.allclose(rel[0, row * 14 + col], expected, atol=1e-7)


def test_kprpe_bias_uses_query_offsets_and_buckets():
    """The bias of (query i, key j) is table_i[bucket(i, j)], with the table a linear map of i's offsets."""
    model = build_kprpe_face_vit("tiny").net
    kps = TEMPLATE.unsqueeze(0)
    with torch.no_grad():
        model.keypoint_linear.weight.normal_()
        tables = model.kprpe_tables(kps, 196)  # (1, depth, heads, N, 49)
    rel = relative_keypoints(kps, 14)[0]
    layer, head, i = 1, 2, 30
    flat = model.keypoint_linear(rel[i])  # layer-major, then head, then bucket
    nb = model.num_buckets
    start = (layer * model.cfg.num_heads + head) * nb
    assert torch.allclose(tables[0, layer, head, i], flat[start : start + nb], atol=1e-6)
    # bucket of a zero displacement is the centre bucket 24 (r=3, c=3 on the 7x7 table)
    assert int(model.bucket_ids[i, i]) == 24
    assert int(model.bucket_ids[0, 195]) == 0 and int(model.bucket_ids[195, 0]) == 48


def test_unknown_size():
    with pytest.raises(ValueError):
        build_kprpe_face_vit("huge")
