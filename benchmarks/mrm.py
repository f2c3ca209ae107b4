"""MRM speed-up, paired: SapiensID with the Masked Recognition Model's keep count vs every candidate token.

Three paired measurements (`benchmarks/paired.py`: A = MRM, B = all tokens, alternating AB/BA, >= 5 pairs,
headline = median of per-pair ratios time(all) / time(MRM), with min and max):

* ``train_step_speedup_1t`` / ``train_step_speedup_2t``: the FULL training step of `sapiensid.train.Trainer`
  (forward, AdaFace with the Partial FC classifier, backward, gradient clipping, both AdamW steps) on the same
  batch of generated WebBody shards, at 1 and at 2 torch threads. Both sides are the same Trainer (same weights,
  same optimisers); only the batch's keep count differs (MRM: int(432 * 0.34) = 146 of 432; all: 432 kept).
* ``model_speedup_1t``: the backbone alone, forward + backward of a toy loss (the mean square of the
  embedding), 1 thread: what the token count changes directly, to compare with the FLOP ratio of the same
  computation (counted with ``torch.utils.flop_counter``, in ``details``).

Writes ``benchmarks/results/mrm.json``. Usage:
python benchmarks/mrm.py [--preset small] [--batch 16] [--pairs 5] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paired import Recorder, paired_ratio  # noqa: E402
from pipeline.runtime import ensure_offline_env  # noqa: E402
from sapiensid.data import to_model_inputs  # noqa: E402
from sapiensid.data.synthetic import write_shards  # noqa: E402
from sapiensid.masking import default_keep_count  # noqa: E402
from sapiensid.train import TrainConfig, Trainer  # noqa: E402


def model_step(model: torch.nn.Module, inputs: tuple, n_keep: int | None) -> None:
    out = model(*inputs, n_keep=n_keep)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def count_flops(model: torch.nn.Module, inputs: tuple, n_keep: int | None) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model_step(model, inputs, n_keep)
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts for the train-step ratio")
    ap.add_argument("--classes", type=int, default=16, help="identities in the generated shards")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mrm.json"))
    args = ap.parse_args(argv)
    ensure_offline_env()
    rec = Recorder("mrm", args, packages=("torch", "numpy"))
    threads = [int(t) for t in args.threads.split(",") if t]

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp) / "shards", args.classes, max(2, 2 * args.batch // args.classes + 1),
                     samples_per_shard=64)
        cfg = TrainConfig(train_shards=str(Path(tmp) / "shards"), output_dir=str(Path(tmp) / "run"),
                          model=args.preset, batch_size=args.batch, keep_tokens="default", num_workers=0,
                          shuffle_buffer=args.batch, max_steps=10_000, warmup_steps=1, tensorboard=False,
                          progress=False, sample_rate=1.0, seed=0)
        trainer = Trainer(cfg)
        batch = next(trainer.loader)
        trainer.loader.close()
    mcfg = trainer.model_cfg
    keep = default_keep_count(mcfg.n_candidates, mcfg.mask_ratio)
    if int(batch["n_keep"]) != keep:
        raise RuntimeError(f"the loader planned {batch['n_keep']} tokens, expected {keep}")
    # "all": every candidate kept, given explicitly (n_keep=None in training mode means the model's default
    # MRM keep count, not "no masking").
    everything = mcfg.n_candidates
    mrm_batch, all_batch = dict(batch, n_keep=keep), dict(batch, n_keep=everything)
    n = len(batch["labels"])

    headlines: dict[str, dict] = {}
    details: dict = {"preset": args.preset, "batch": n, "candidates": mcfg.n_candidates, "keep_tokens": keep,
                     "tokens_in_vit": {"mrm": keep + 2, "all": mcfg.n_candidates + 2},
                     "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
                     "classes": trainer.num_classes}
    for t in threads:
        torch.set_num_threads(t)
        p = paired_ratio(lambda: trainer.train_step(mrm_batch), lambda: trainer.train_step(all_batch),
                         pairs=args.pairs)
        headlines[f"train_step_speedup_{t}t"] = p.summary(
            note=f"full Trainer.train_step, {args.preset} preset, batch {n}, {t} thread(s)")
        details[f"train_step_seconds_{t}t"] = {"mrm": [round(x, 4) for x in p.a_seconds],
                                               "all": [round(x, 4) for x in p.b_seconds]}
        print(f"train step, {t} thread(s): MRM/all speed-up {p.median:.3f} (min {min(p.ratios):.3f}, "
              f"max {max(p.ratios):.3f})", flush=True)

    torch.set_num_threads(1)
    model = trainer.model.train()
    inputs = to_model_inputs(batch, trainer.device)
    flops = {"mrm": count_flops(model, inputs, keep), "all": count_flops(model, inputs, everything)}
    flop_ratio = flops["all"] / flops["mrm"]
    p = paired_ratio(lambda: model_step(model, inputs, keep), lambda: model_step(model, inputs, everything),
                     pairs=args.pairs)
    headlines["model_speedup_1t"] = p.summary(
        target=f">= {0.9 * flop_ratio:.3f}",
        note=f"backbone forward+backward of a toy loss, 1 thread; target 90 % of its FLOP ratio {flop_ratio:.3f}")
    details["model_flop_ratio"] = round(flop_ratio, 4)
    details["model_gflop_per_sample_fwd_bwd"] = {k: round(v / n / 1e9, 3) for k, v in flops.items()}
    details["model_speedup_over_flop_ratio"] = round(p.median / flop_ratio, 4)
    print(f"model alone, 1 thread: {p.median:.3f} (FLOP ratio {flop_ratio:.3f})", flush=True)
    rec.write(headlines, details, path=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
