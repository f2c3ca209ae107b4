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
TRAIN_PER_IDENTITY = 40
HELD_OUT_PER_IDENTITY = 4
STEPS = 250
# Test settings, chosen so the tiny model converges within 250 CPU steps:
# - 40 generated images per identity (with 12, 300 steps overfit: held-out top-1 fell to 79 %);
# - 64 px input (8 px patches, an 8x8 grid per ROI, 192 candidates) so MRM's 96 kept tokens are half of them
#   (at 96 px, 96 of 432 reached only ~62 % held-out top-1 after 200 steps);
# - AdaFace margin 0.2 instead of the paper's 0.4 (24 identities converge too slowly at 0.4 on CPU);
# - lr 6e-3 with a flatter cosine (floor 0.1 x lr), weaker colour jitter and no random bottom crop (the
#   generator already draws partial views): at 96 px the 200-step run underfit (train accuracy ~0.7-0.9).
MODEL_OVERRIDES = {"input_size": 64}
KEEP_TOKENS = 96
ADAFACE_M = 0.2
AUGMENT = {"color_prob": 0.3, "crop_prob": 0.0}


@pytest.mark.slow
def test_tiny_model_learns_identities_on_cpu(tmp_path):
    torch.set_num_threads(2)
    write_shards(tmp_path / "train", N_IDENTITIES, TRAIN_PER_IDENTITY, samples_per_shard=100, image_seed=0)
    write_shards(tmp_path / "heldout", N_IDENTITIES, HELD_OUT_PER_IDENTITY, split="test", image_seed=1)
    held_out = [DatasetSpec("heldout", "webbody_shards", str(tmp_path / "heldout"))]

    torch.manual_seed(0)
    untrained = SapiensID(SapiensIDConfig.preset("tiny", **MODEL_OVERRIDES))
    before = evaluate_model(untrained, held_out)["heldout"]["general"]
    # Chance is 1/24 ~ 4 %; an untrained network ranks by background and colour statistics.
    assert before["top1"] <= 35.0, before

    cfg = TrainConfig(
        train_shards=str(tmp_path / "train"), output_dir=str(tmp_path / "run"), model="tiny",
        model_overrides=MODEL_OVERRIDES, augment=AUGMENT, batch_size=32, keep_tokens=KEEP_TOKENS, num_workers=1,
        shuffle_buffer=300, lr=6e-3, min_lr_ratio=0.1, warmup_steps=20,
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
