"""Fine-tuning works, for real: a model pre-trained on the visible domain only is fine-tuned on vis + ir images
of other identities, and its cross-domain rank-1 on a third, held-out set of identities rises well above the
pre-trained model's.

Three disjoint identity sets (generated as sapiensid/data/synthetic.py does): 24 for visible-only pre-training,
16 for fine-tuning, 16 held out for evaluation. The ``ir`` domain is greyscale with inverted intensity, blur and
noise: the colour a visible-light model leans on is gone and the intensities are reversed, so the pre-trained
model ranks the wrong people first (below chance). One CPU thread: the result does not depend on the host's
thread count.
"""

from __future__ import annotations

import pytest
import torch

from sapiensid.finetune import FinetuneConfig, finetune
from sapiensid.finetune.adapt import load_base
from sapiensid.finetune.data import read_folder
from sapiensid.finetune.evaluate import evaluate_cross_domain
from sapiensid.finetune.synthetic import write_multidomain

MODEL = {"input_size": 48}
PROTOCOLS = ["vis->ir", "ir->vis"]
TEST_IDS = 16  # chance rank-1: 1/16 = 6.25 %


def _rank1(model, test) -> float:
    res = evaluate_cross_domain(model, test, PROTOCOLS, ("global",))["global"]
    return sum(res[p]["image"]["top1"] for p in PROTOCOLS) / len(PROTOCOLS)


@pytest.mark.slow
def test_finetuning_raises_held_out_cross_domain_rank1(tmp_path):
    torch.set_num_threads(1)
    write_multidomain(tmp_path / "pre", range(0, 24), 10, ("vis",), size=64)
    write_multidomain(tmp_path / "train", range(100, 116), 5, ("vis", "ir"), size=64)
    write_multidomain(tmp_path / "test", range(200, 200 + TEST_IDS), 4, ("vis", "ir"), size=64, image_seed=1)
    train_ids = {im.identity for im in read_folder(tmp_path / "train").images}
    test = read_folder(tmp_path / "test", missing_domain="keep", min_images=1)
    assert not train_ids & set(test.identities)

    pre = FinetuneConfig(base_model="tiny", model_overrides=MODEL, train_root=str(tmp_path / "pre"),
                         output_dir=str(tmp_path / "pretrain"), adaptation="full", p=8, k=4, lr=3e-3,
                         warmup_steps=5, max_steps=80, ckpt_every=10_000)
    finetune(pre)
    base_ckpt = tmp_path / "pretrain" / "final" / "model.pt"
    before = _rank1(load_base(base_ckpt, None), test)

    ft = FinetuneConfig(base_checkpoint=str(base_ckpt), train_root=str(tmp_path / "train"),
                        output_dir=str(tmp_path / "ft"), adaptation="full", sampler="domain_aware", p=8, k=2,
                        lr=2e-3, warmup_steps=5, max_steps=150, ckpt_every=10_000)
    summary = finetune(ft)
    after = _rank1(summary["model"], test)
    assert summary["mining"]["hard_pos_cross_domain"] > 0.3  # the triplet term did work across domains
    # Margin: twice chance and 10 points above the pre-trained model. One exploratory run of this setup
    # (outside the test) gave 0 % before and 21 % after; 80 fine-tuning steps gave 15 %.
    chance = 100.0 / TEST_IDS
    assert after >= 2 * chance and after >= before + 10.0, (before, after)
