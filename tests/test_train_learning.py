"""Learning, for real: the tiny SapiensID goes from chance to >= 90 % held-out top-1 on generated identities (CPU).

Each identity is a distinct figure (clothes colours, shirt pattern, head shape, proportions, hat) drawn under a
new pose, scale, position, crop and cluttered background in every image; the held-out images use poses and
backgrounds never seen in training. Evaluation is ReID-style (one held-out query per identity against the
other held-out images), with flip TTA, through the same code as `webbody evaluate`.
"""

from __future__ import annotations

import pytest
import torch

from sapiensid.config import SapiensIDConfig
from sapiensid.data.synthetic import write_shards
from sapiensid.evaluate import DatasetSpec, evaluate_model
from sapiensid.model import SapiensID
from sapiensid.train import TrainConfig, Trainer

N_IDENTITIES = 24
TRAIN_PER_IDENTITY = 12
HELD_OUT_PER_IDENTITY = 4
STEPS = 200
# Test settings: MRM keeps 96 of the tiny model's 432 candidate tokens
# (48 left too few for a 2-layer model: held-out top-1 ~46 % after 120 steps), and the AdaFace margin is 0.2
# instead of the paper's 0.4 because 24 identities x 12 images converge too slowly at 0.4 on CPU.
KEEP_TOKENS = 96
ADAFACE_M = 0.2


@pytest.mark.slow
def test_tiny_model_learns_identities_on_cpu(tmp_path):
    torch.set_num_threads(2)
    write_shards(tmp_path / "train", N_IDENTITIES, TRAIN_PER_IDENTITY, samples_per_shard=100, image_seed=0)
    write_shards(tmp_path / "heldout", N_IDENTITIES, HELD_OUT_PER_IDENTITY, split="test", image_seed=1)
    held_out = [DatasetSpec("heldout", "webbody_shards", str(tmp_path / "heldout"))]

    torch.manual_seed(0)
    before = evaluate_model(SapiensID(SapiensIDConfig.preset("tiny")), held_out)["heldout"]["general"]
    # Chance is 1/24 ~ 4 %; an untrained network ranks by background and colour statistics.
    assert before["top1"] <= 35.0, before

    cfg = TrainConfig(
        train_shards=str(tmp_path / "train"), output_dir=str(tmp_path / "run"), model="tiny",
        batch_size=32, keep_tokens=KEEP_TOKENS, num_workers=1, shuffle_buffer=300, lr=3e-3, warmup_steps=20,
        max_steps=STEPS, adaface_m=ADAFACE_M, weight_decay=0.05, ckpt_every=10_000, tensorboard=False, progress=True, seed=0,
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["step"] == STEPS and summary["skipped_samples"] == 0
    losses = [h["loss"] for h in trainer.history]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

    after = evaluate_model(trainer.model, held_out)["heldout"]["general"]
    assert after["num_valid_query"] == N_IDENTITIES
    assert after["top1"] >= 90.0, (before, after)
