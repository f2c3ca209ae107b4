"""Fine-tuning works, for real: a model pre-trained on the visible domain only is fine-tuned on vis + ir images
of other identities, and its cross-domain rank-1 on a third, held-out set of identities rises well above the
pre-trained model's.

Disjoint identity sets (generated as sapiensid/data/synthetic.py does): PRETRAIN_IDS for visible-only
pre-training, TRAIN_IDS for fine-tuning (vis + ir), DEV_IDS to choose the settings and HELD_OUT_IDS for the
test, each evaluation set with an image seed no other set uses. The ``ir`` domain is greyscale with inverted
intensity, blur and noise: the colour a visible-light model leans on is gone and the intensities are reversed,
so the pre-trained model ranks the wrong people first. Rank-1 is per image, over every query of vis->ir and
ir->vis (2 x EVAL_IDS x EVAL_PER_DOMAIN queries), and counted in queries. One CPU thread: the result does not
depend on the host's thread count.

How the settings were chosen, so that the held-out figures are not tuned: every setting below (steps, learning
rates, set sizes and the bars of the assertions) was fixed by running ``python -m tests.test_finetune_learning
--dev`` (the same pre-training and fine-tuning, evaluated on DEV_IDS with DEV_IMAGE_SEED). The held-out
identities were evaluated only by this test, once, after that, and the bars were not moved afterwards. The dev
and held-out figures are in DEV_RESULTS / HELD_OUT_RESULTS below. (An earlier version of this test set its bar
after looking at its held-out result on identities 200-215 with image seed 1; those are used by no set here.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

from sapiensid.finetune import FinetuneConfig, finetune
from sapiensid.finetune.adapt import load_base
from sapiensid.finetune.data import read_folder
from sapiensid.finetune.evaluate import evaluate_cross_domain
from sapiensid.finetune.synthetic import write_multidomain

MODEL = {"input_size": 48}
PROTOCOLS = ["vis->ir", "ir->vis"]
PRETRAIN_IDS, PRETRAIN_PER_DOMAIN = range(0, 24), 10  # visible only, image seed 0
TRAIN_IDS, TRAIN_PER_DOMAIN = range(100, 116), 5  # vis + ir, image seed 0
EVAL_PER_DOMAIN = 4
DEV_IDS, DEV_IMAGE_SEED = range(300, 316), 2  # used to choose the settings (`--dev`)
HELD_OUT_IDS, HELD_OUT_IMAGE_SEED = range(400, 416), 3  # used only by the test
PRETRAIN_STEPS = 80
FINETUNE_STEPS = 150

# Bars (fixed from the dev run, see the module docstring). Chance rank-1 is 1 / len(eval ids) = 6.25 %.
MIN_OVER_CHANCE = 1.5  # fine-tuned rank-1 >= this x chance (12 of the 128 queries)
MARGIN_QUERIES = 10  # fine-tuned rank-1 beats the pre-trained model's by at least this many of the 128 queries
MIN_HARD_POS_CROSS_DOMAIN = 0.3  # share of hardest positives from the other domain (the triplet works across)
# DEV_RESULTS, `python -m tests.test_finetune_learning --dev` (2026-12-02 00:50-00:58 UTC, shared machine at load
# ~8-13: 497 s wall, 97.5 s CPU on 1 thread), the settings above:
#   pre-trained 0 of 128 queries (vis->ir 0 %, ir->vis 0 %); fine-tuned 21 of 128 = 16.4 % (vis->ir 18.8 %,
#   ir->vis 14.1 %); hardest positive in the other domain 0.80, hardest negative in the same domain 0.68.
# The bars leave 9 queries (rank-1 over chance) and 11 queries (margin) of room under these dev figures: the
# binomial spread of 128 queries at ~16 % alone is ~4 queries. Fixed before the held-out identities were run.
# HELD_OUT_RESULTS, the one run of this test after the bars were fixed (2026-12-02 01:17-01:40 UTC, load ~20-30:
# 1342 s wall, 100.6 s CPU): pre-trained 0 of 128 queries; fine-tuned 17 of 128 = 13.3 % (vis->ir 10.9 %,
# ir->vis 15.6 %), 2.1x chance, margin 17 queries: passed. (A first attempt hit pytest's 900 s default timeout
# during fine-tuning, before any held-out figure was printed.)


def _hits(model: torch.nn.Module, test) -> dict:
    res = evaluate_cross_domain(model, test, PROTOCOLS, ("global",))["global"]
    per = {p: res[p]["image"] for p in PROTOCOLS}
    queries = sum(r["num_valid_query"] for r in per.values())
    hits = sum(round(r["top1"] / 100.0 * r["num_valid_query"]) for r in per.values())
    return {"hits": hits, "queries": queries, "rank1": 100.0 * hits / queries,
            **{f"{p}_top1": r["top1"] for p, r in per.items()}}


def learn_and_evaluate(tmp: Path, eval_ids: range, eval_image_seed: int, pretrain_steps: int = PRETRAIN_STEPS,
                       finetune_steps: int = FINETUNE_STEPS) -> dict:
    torch.set_num_threads(1)
    t0, c0 = time.monotonic(), time.process_time()
    write_multidomain(tmp / "pre", PRETRAIN_IDS, PRETRAIN_PER_DOMAIN, ("vis",), size=64)
    write_multidomain(tmp / "train", TRAIN_IDS, TRAIN_PER_DOMAIN, ("vis", "ir"), size=64)
    write_multidomain(tmp / "eval", eval_ids, EVAL_PER_DOMAIN, ("vis", "ir"), size=64, image_seed=eval_image_seed)
    train_ids = {im.identity for im in read_folder(tmp / "train").images}
    pre_ids = {im.identity for im in read_folder(tmp / "pre").images}
    test = read_folder(tmp / "eval", missing_domain="keep", min_images=1)

    pre = FinetuneConfig(base_model="tiny", model_overrides=MODEL, train_root=str(tmp / "pre"),
                         output_dir=str(tmp / "pretrain"), adaptation="full", p=8, k=4, lr=3e-3,
                         warmup_steps=5, max_steps=pretrain_steps, ckpt_every=10_000)
    finetune(pre)
    base_ckpt = tmp / "pretrain" / "final" / "model.pt"
    before = _hits(load_base(base_ckpt, None), test)

    ft = FinetuneConfig(base_checkpoint=str(base_ckpt), train_root=str(tmp / "train"),
                        output_dir=str(tmp / "ft"), adaptation="full", sampler="domain_aware", p=8, k=2,
                        lr=2e-3, warmup_steps=5, max_steps=finetune_steps, ckpt_every=10_000)
    summary = finetune(ft)
    after = _hits(summary.pop("model"), test)
    return {"eval_ids": [eval_ids.start, eval_ids.stop], "eval_image_seed": eval_image_seed,
            "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
            "overlap_train_eval": sorted(set(test.identities) & (train_ids | pre_ids)),
            "chance": 100.0 / len(eval_ids), "pretrained": before, "finetuned": after,
            "mining": summary["mining"], "final_loss": summary["final_loss"], "step": summary["step"],
            "wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}


@pytest.mark.slow
@pytest.mark.timeout(2700)  # ~100 s of CPU; at load 20 on the shared 2 cores that is over the default 900 s
def test_finetuning_raises_held_out_cross_domain_rank1(tmp_path):
    prev = torch.get_num_threads()
    try:
        r = learn_and_evaluate(tmp_path, HELD_OUT_IDS, HELD_OUT_IMAGE_SEED)
    finally:
        torch.set_num_threads(prev)
    print(json.dumps(r))
    assert r["overlap_train_eval"] == [], r  # held-out identities were never trained on
    assert r["step"] == FINETUNE_STEPS
    before, after = r["pretrained"], r["finetuned"]
    assert before["queries"] == after["queries"] == len(PROTOCOLS) * len(HELD_OUT_IDS) * EVAL_PER_DOMAIN
    assert r["mining"]["hard_pos_cross_domain"] > MIN_HARD_POS_CROSS_DOMAIN, r
    assert after["rank1"] >= MIN_OVER_CHANCE * r["chance"], r
    assert after["hits"] - before["hits"] >= MARGIN_QUERIES, r


def main(argv: list[str] | None = None) -> int:
    """`--dev`: the same runs evaluated on the DEV identities (how the settings were chosen)."""
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m tests.test_finetune_learning")
    ap.add_argument("--dev", action="store_true", required=True)
    ap.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    ap.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = learn_and_evaluate(Path(tmp), DEV_IDS, DEV_IMAGE_SEED, args.pretrain_steps, args.finetune_steps)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
