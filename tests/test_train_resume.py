"""Stopping and resuming a run reproduces the uninterrupted loss trajectory exactly."""

from __future__ import annotations

import json

import pytest
import torch

from sapiensid.data.synthetic import write_shards
from sapiensid.train import TrainConfig, Trainer, infer_num_classes, lr_factor, train


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_shards")
    write_shards(out, n_identities=8, per_identity=6, samples_per_shard=16)
    return out


def _cfg(shard_dir, out, **kw) -> TrainConfig:
    base = dict(
        train_shards=str(shard_dir), output_dir=str(out), model="tiny", batch_size=6, keep_tokens=48,
        variable_masking=True, min_keep=24, masking_lambda=1.0, max_batch_size=12, num_workers=0,
        shuffle_buffer=10, lr=2e-3, warmup_steps=2, max_steps=6, ckpt_every=100, tensorboard=False,
        progress=False, seed=5,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_resume_reproduces_loss_trajectory(shard_dir, tmp_path):
    torch.set_num_threads(1)  # same reduction order in both runs
    full = Trainer(_cfg(shard_dir, tmp_path / "full"))
    full.fit()
    ref = [h["loss"] for h in full.history]
    assert len(ref) == 6

    first = train(_cfg(shard_dir, tmp_path / "split", stop_after=3))
    assert first["step"] == 3
    resumed = Trainer(_cfg(shard_dir, tmp_path / "split"))
    resumed.fit()
    assert resumed.step == 6
    got = [h["loss"] for h in resumed.history]
    assert got[:3] == ref[:3]  # history restored from the checkpoint
    assert got[3:] == ref[3:]  # and the continuation is bit-identical
    summary = json.loads((tmp_path / "split" / "train_summary.json").read_text())
    assert summary["step"] == 6 and summary["num_classes"] == 8
    ckpts = sorted((tmp_path / "split" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]


def test_config_and_schedule(shard_dir, tmp_path):
    assert infer_num_classes(str(shard_dir), "train") == 8
    with pytest.raises(ValueError, match="unknown train config"):
        TrainConfig.from_dict({"learning_rate": 1})
    (tmp_path / "c.yaml").write_text("train:\n  model: tiny\n  lr: 0.5\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml", {"max_steps": 9})
    assert cfg.lr == 0.5 and cfg.max_steps == 9 and cfg.model == "tiny"
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.01) == pytest.approx(0.01)


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_resume(shard_dir, tmp_path):
    """DDP on CPU (gloo) through torchrun: per-rank classifier shards and loader states, then a resume."""
    from sapiensid.train import launch_torchrun

    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"train:\n  train_shards: {shard_dir}\n  output_dir: {tmp_path / 'ddp'}\n  model: tiny\n  batch_size: 4\n"
        "  keep_tokens: 32\n  num_workers: 0\n  max_steps: 4\n  warmup_steps: 1\n  shuffle_buffer: 4\n"
        "  tensorboard: false\n  progress: false\n  ckpt_every: 2\n"
    )
    assert launch_torchrun(str(cfg), 2, ["stop_after=2"]) == 0
    step2 = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    assert {p.name for p in step2.iterdir()} == {"model.pt", "rank0.pt", "rank1.pt", "DONE"}
    r0 = torch.load(step2 / "rank0.pt", weights_only=False)
    r1 = torch.load(step2 / "rank1.pt", weights_only=False)
    assert r0["head"]["weight"].shape[0] + r1["head"]["weight"].shape[0] == 8  # classes split over ranks
    assert r0["loader"]["world"] == 2
    assert launch_torchrun(str(cfg), 2) == 0  # resumes at step 2, runs to 4
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["step"] == 4
    assert [h["step"] for h in r0["history"]] == [1, 2]


def test_keep_tokens_none_turns_mrm_off(shard_dir, tmp_path):
    """`keep_tokens: null` trains on every valid token; an int sets the model's keep count."""
    from sapiensid.data import to_model_inputs

    trainer = Trainer(_cfg(shard_dir, tmp_path / "off", keep_tokens=None, variable_masking=False,
                           model_overrides={"input_size": 32}, max_steps=1))
    assert trainer.model.keep_tokens is None
    seen: list[int] = []
    hook = trainer.model.net.backbone.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
    try:
        batch = next(trainer.loader)
        trainer.train_step(batch)
        images, masks, ldmks = to_model_inputs(batch, trainer.device)
        trainer.model.eval()
        with torch.no_grad():
            _, aux = trainer.model.net(images, masks, ldmks, return_aux=True)
    finally:
        hook.remove()
        trainer.loader.close()
    most_valid = int(aux["valid"].sum(dim=1).max())
    assert most_valid > 16  # more than the preset's MRM count int(48 * 0.34) = 16, so the check can fail
    assert seen[0] == most_valid + 2  # training step: CLS + every valid token + the mask token

    on = Trainer(_cfg(shard_dir, tmp_path / "on", keep_tokens=10, variable_masking=False, max_steps=1))
    assert on.model.keep_tokens == 10
    on.loader.close()
