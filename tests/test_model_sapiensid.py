"""SapiensID behaviour: batch independence, h-flip, determinism, training, masking rules, strict loading."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sapiensid.checkpoint import CheckpointMismatchError
from sapiensid.masking import keep_count_for_batch, lr_for_keep, select_tokens, variable_keep_count
from sapiensid.model import (
    SapiensID,
    SapiensIDConfig,
    embed_with_flip,
    hflip_inputs,
    load_sapiensid_weights,
)
from tests.model_helpers import SAPIENSID_MANIFEST, load_manifest, signature, synth_state
from tests.test_model_retina import _person_keypoints

S = 96


def _inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, S, S, generator=g) * 2 - 1
    kps = _person_keypoints(b)
    fg = torch.ones(b, S, S, dtype=torch.bool)
    return images, fg, kps


def _randomise(model: SapiensID) -> SapiensID:
    """Non-zero KP-RPE last layer and part weights so every branch affects the output."""
    torch.manual_seed(123)
    with torch.no_grad():
        model.net.rpe_module.keypoint_linear.fc[2].weight.normal_(std=0.05)
        model.net.head.learned_mask.normal_()
    return model


def test_eval_embedding_is_batch_independent():
    model = _randomise(SapiensID(SapiensIDConfig.preset("tiny"))).eval()
    images, fg, kps = _inputs(3)
    kps[1, 17:] = -1  # fewer valid tokens -> padded inside the batch
    kps[1, 0:3] = -1
    fg[2, :, :40] = False  # much fewer whole-image tokens
    with torch.no_grad():
        batch = model(images, fg, kps)
        alone = torch.cat([model(images[i : i + 1], fg[i : i + 1], kps[i : i + 1]) for i in range(3)])
    assert (batch - alone).abs().max().item() < 1e-4 * alone.abs().max().item()


def test_reference_padding_switch_is_batch_dependent():
    cfg = SapiensIDConfig.preset("tiny", mask_padding=False)
    model = _randomise(SapiensID(cfg)).eval()
    images, fg, kps = _inputs(2)
    kps[1, 17:] = -1
    kps[1, 0:3] = -1
    with torch.no_grad():
        batch = model(images, fg, kps)
        alone = model(images[1:], fg[1:], kps[1:])
    # the reference forward lets padding tokens into attention: sample 1 changes with its neighbour
    assert (batch[1] - alone[0]).abs().max().item() > 1e-4 * alone.abs().max().item()


def test_hflip_helper_and_flip_embedding():
    images, fg, kps = _inputs(2)
    kps[0, 5] = -1
    fi, fm, fk = hflip_inputs(images, fg, kps)
    assert torch.equal(fi[..., 0], images[..., -1])
    # left shoulder (5) of the flip is the mirrored right shoulder (6); missing stays missing
    assert torch.allclose(fk[1, 5], torch.stack([1 - kps[1, 6, 0], kps[1, 6, 1]]))
    assert torch.equal(fk[0, 6], torch.tensor([-1.0, -1.0]))
    assert torch.allclose(fk[1, 17], torch.stack([1 - kps[1, 18, 0], kps[1, 18, 1]]))  # face eyes swap
    ri, rm, rk = hflip_inputs(fi, fm, fk)
    assert torch.equal(ri, images) and torch.equal(rm, fg) and torch.allclose(rk, kps)

    model = _randomise(SapiensID(SapiensIDConfig.preset("tiny"))).eval()
    emb = embed_with_flip(model, images, fg, kps)
    emb_flipped = embed_with_flip(model, fi, fm, fk)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert (emb - emb_flipped).abs().max().item() < 1e-4  # f(x) + f(flip x) is flip-invariant


def test_training_forward_is_deterministic_under_a_seed():
    model = SapiensID(SapiensIDConfig.preset("tiny")).train()
    images, fg, kps = _inputs(4)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(images, fg, kps, n_keep=40)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # token selection and augmentation are random


def test_keep_count_controls_sequence_length():
    model = SapiensID(SapiensIDConfig.preset("tiny")).train()
    assert model.keep_tokens == int(model.n_candidates * (1 - 0.66))
    images, fg, kps = _inputs(2)
    model.set_keep_tokens(30)
    _, aux = model.net(images, fg, kps, return_aux=True)
    assert aux["ids_keep"].shape == (2, 30)
    # the single mask token stands for every candidate that is not a kept valid token
    expected = torch.log((model.n_candidates - aux["kept_valid"].sum(1)).float())
    assert torch.allclose(aux["log_count"][:, -1], expected)
    with pytest.raises(ValueError):
        model.set_keep_tokens(0)
    model.set_keep_tokens(None)  # MRM off: every valid token, as at evaluation
    _, aux = model.net(images, fg, kps, return_aux=True)
    assert aux["kept_valid"].sum(1).tolist() == aux["valid"].sum(1).tolist()


@pytest.mark.slow
def test_small_config_trains_with_falling_loss():
    torch.manual_seed(0)
    model = SapiensID(SapiensIDConfig.preset("small")).train()
    n_id, per_id = 3, 2
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(n_id, 3, S, S, generator=g) * 2 - 1
    images = protos.repeat_interleave(per_id, 0) + 0.1 * torch.randn(n_id * per_id, 3, S, S, generator=g)
    labels = torch.arange(n_id).repeat_interleave(per_id)
    kps = _person_keypoints(n_id * per_id)
    fg = torch.ones(n_id * per_id, S, S, dtype=torch.bool)
    classifier = torch.nn.Linear(model.output_dim, n_id)
    params = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4)
    model.set_keep_tokens(64)

    def loss_at_fixed_seeds() -> float:
        # token selection is random: compare the loss averaged over the same three draws
        with torch.no_grad():
            vals = []
            for seed in (100, 101, 102):
                torch.manual_seed(seed)
                vals.append(F.cross_entropy(classifier(model(images, fg, kps)), labels).item())
        return sum(vals) / len(vals)

    before = loss_at_fixed_seeds()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(classifier(model(images, fg, kps)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = loss_at_fixed_seeds()
    assert all(math.isfinite(v) for v in losses)
    assert after < 0.5 * before, (before, after, losses)
    assert model.net.backbone.pos_embed.grad is None  # the sin-cos PE stays frozen


def test_variable_masking_rate_rules():
    class Fixed:
        def __init__(self, u: float) -> None:
            self.u = u

        def random(self) -> float:
            return self.u

    assert variable_keep_count(432, 146, 2.0, Fixed(0.0)) == 432
    assert variable_keep_count(432, 146, 2.0, Fixed(1.0)) == round(146 + 286 * math.exp(-2.0))
    assert variable_keep_count(432, 146, 0.0, Fixed(0.7)) == 432
    rng = random.Random(0)
    draws = [variable_keep_count(432, 146, 5.0, rng) for _ in range(200)]
    assert min(draws) >= 146 and max(draws) <= 432 and len(set(draws)) > 20
    # n_k^2 * B constant, learning rate linear in the implied batch
    assert keep_count_for_batch(146, 256, 64) == 292
    assert keep_count_for_batch(146, 256, 1024) == 73
    assert lr_for_keep(1e-4, 146, 73) == pytest.approx(4e-4)
    with pytest.raises(ValueError):
        variable_keep_count(100, 0, 1.0, rng)


def test_select_tokens_valid_first():
    valid = torch.tensor([[False, True, False, True, True, False]])
    ids, ok = select_tokens(valid, 4, training=True)
    assert ok[0, :3].all() and not ok[0, 3]
    ids, ok = select_tokens(valid, None, training=False)
    assert ids.tolist() == [[1, 3, 4]] and ok.all()
    ids, ok = select_tokens(valid, None, training=True)
    assert sorted(ids[0].tolist()) == [1, 3, 4] and ok.all()


def test_base_state_dict_matches_release_manifest():
    manifest = load_manifest(SAPIENSID_MANIFEST)
    with torch.device("meta"):
        model = SapiensID(SapiensIDConfig.preset("base"))
    sd = model.state_dict()
    assert signature(sd) == manifest["signature_sha256"]
    assert sum(p.numel() for p in model.parameters()) == manifest["counts"]["num_parameters"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == manifest["counts"]["num_trainable_parameters"]
    with torch.device("meta"):
        with_level = SapiensID(SapiensIDConfig.preset("base", level_emb=True))
    extra = set(with_level.state_dict()) - set(sd)
    assert extra == set(manifest["optional_keys_if_level_emb_true"])


def test_strict_loading_layouts_and_errors(tmp_path):
    model = SapiensID(SapiensIDConfig.preset("tiny"))
    state = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in model.state_dict().items()}
    flat = tmp_path / "model.pth"
    torch.save(state, flat)
    load_sapiensid_weights(model, flat)
    assert torch.equal(model.state_dict()["net.mask_token"], state["net.mask_token"])

    nested = tmp_path / "checkpoint.pth"
    torch.save({"model_state_dict": {f"model.{k}": v * 2 for k, v in state.items()}, "epoch": 3}, nested)
    load_sapiensid_weights(model, nested)
    assert torch.equal(model.state_dict()["net.head.learned_mask"], state["net.head.learned_mask"] * 2)

    bad = dict(state)
    bad.pop("net.head.attn.lambda_q1")
    bad["net.head.flatten_feature.0.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_sapiensid_weights(model, tmp_path / "bad.pth")
    assert "net.head.attn.lambda_q1" in str(err.value) and "net.head.flatten_feature.0.weight" in str(err.value)


@pytest.mark.slow
def test_base_loads_synthesised_release(tmp_path):
    """Full size: the 411 M-parameter base model loads a manifest-shaped training checkpoint strictly
    (the flat layout is exercised with the tiny preset above)."""
    manifest = load_manifest(SAPIENSID_MANIFEST)
    state = synth_state(manifest)
    probe = "net.rpe_module.keypoint_linear.fc.2.bias"
    expected = state[probe].clone()
    torch.save({"model_state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    del state
    model = SapiensID(SapiensIDConfig.preset("base"))
    load_sapiensid_weights(model, tmp_path / "ckpt.pth")
    assert torch.equal(model.state_dict()[probe], expected)
