"""Fine-tuning on a new domain, on the generated multi-domain set (tiny preset, CPU).

1. Pre-train the tiny model on the visible domain only (its own identities).
2. LoRA vs full fine-tuning at 8, 16, 32 and 96 training subjects (domain-aware sampling, vis + ir): held-out
   cross-domain rank-1 (per-image and template, vis->ir and ir->vis, identities never seen in training),
   trainable parameters, seconds per step. Per-step time LoRA / full is also measured as a paired ratio
   (interleaved steps of both, same batch).
3. Domain-aware vs random P x K sampling at 16 subjects with four domains (vis, swir, mwir, lwir): rank-1 per
   query domain -> vis gallery, and the spread across the three infrared-like domains.

Writes ``benchmarks/results/finetune.json``; docs/benchmarks.md renders it.

Usage: python benchmarks/finetune.py [--steps 40] [--pretrain-steps 60] [--subjects 8 16 32 96] [--seeds 0]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paired import Recorder, headline, paired_ratio  # noqa: E402
from sapiensid.finetune import FinetuneConfig, finetune  # noqa: E402
from sapiensid.finetune.data import InputCache, read_folder  # noqa: E402
from sapiensid.finetune.evaluate import evaluate_cross_domain  # noqa: E402
from sapiensid.finetune.samplers import PKSampler  # noqa: E402
from sapiensid.finetune.synthetic import write_multidomain  # noqa: E402
from sapiensid.finetune.trainer import build_model  # noqa: E402

MODEL = {"input_size": 48}
IR_DOMAINS = ("swir", "mwir", "lwir")


def _subset(root: Path, out: Path, n: int) -> Path:
    """A view of the first `n` identities of a generated set (symlinks, no copies)."""
    for dom in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / dom.name).mkdir(parents=True, exist_ok=True)
        for ident in sorted(dom.iterdir())[:n]:
            (out / dom.name / ident.name).symlink_to(ident.resolve())
    (out / "keypoints.json").symlink_to((root / "keypoints.json").resolve())
    return out


def _rank1(res: dict, protos: list[str]) -> dict[str, float]:
    g = res["global"]
    return {"image_rank1": float(np.mean([g[p]["image"]["top1"] for p in protos])),
            "template_rank1": float(np.mean([g[p]["template"]["rank1"] for p in protos])),
            **{f"{p}_image_rank1": g[p]["image"]["top1"] for p in protos}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--subjects", type=int, nargs="+", default=[8, 16, 32, 96])
    ap.add_argument("--sampler-subjects", type=int, default=16)
    ap.add_argument("--per-domain", type=int, default=3)
    ap.add_argument("--test-subjects", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr-full", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rec = Recorder("finetune", args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_finetune_"))
    t0 = time.time()
    write_multidomain(work / "pre", range(0, 24), 8, ("vis",), size=64)
    write_multidomain(work / "pool", range(1000, 1000 + max(args.subjects)), args.per_domain, ("vis", "ir"), size=64)
    write_multidomain(work / "test", range(5000, 5000 + args.test_subjects), args.per_domain, ("vis", "ir"), size=64,
                      image_seed=1)
    write_multidomain(work / "pool4", range(2000, 2000 + args.sampler_subjects), args.per_domain,
                      ("vis",) + IR_DOMAINS, size=64)
    write_multidomain(work / "test4", range(6000, 6000 + args.test_subjects), args.per_domain, ("vis",) + IR_DOMAINS,
                      size=64, image_seed=1)
    print(f"data written in {time.time() - t0:.0f} s")

    pre = FinetuneConfig(base_model="tiny", model_overrides=MODEL, train_root=str(work / "pre"),
                         output_dir=str(work / "pretrain"), adaptation="full", p=8, k=4, lr=3e-3, warmup_steps=5,
                         max_steps=args.pretrain_steps, ckpt_every=10_000)
    pre_summary = finetune(pre)
    base_ckpt = str(work / "pretrain" / "final" / "model.pt")
    test = read_folder(work / "test", missing_domain="keep", min_images=1)
    protos = ["vis->ir", "ir->vis"]
    base_model = pre_summary.pop("model")
    base_res = _rank1(evaluate_cross_domain(base_model, test, protos, ("global",)), protos)
    print(f"pre-trained (vis only): {base_res}")

    runs = []
    for seed in args.seeds:
        for n in args.subjects:
            root = _subset(work / "pool", work / f"pool_{n}_{seed}", n)
            for ad in ("lora", "full"):
                cfg = FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(root), output_dir=str(work / f"{ad}_{n}_{seed}"),
                                     adaptation=ad, p=8, k=2, lr=args.lr_lora if ad == "lora" else args.lr_full,
                                     warmup_steps=5, max_steps=args.steps, ckpt_every=10_000, seed=seed)
                s = finetune(cfg)
                r = _rank1(evaluate_cross_domain(s.pop("model"), test, protos, ("global",)), protos)
                runs.append({"subjects": n, "adaptation": ad, "seed": seed, **r, "trainable": s["trainable"],
                             "s_per_step": round(s["seconds_per_step"], 3)})
                print(runs[-1])

    # paired per-step time, LoRA / full, on the same batches
    cfgs = {ad: FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(work / "pool_16_0" if 16 in args.subjects
                                                                          else work / "pool"),
                               adaptation=ad) for ad in ("lora", "full")}
    ds = read_folder(cfgs["lora"].train_root)
    models = {ad: build_model(c) for ad, c in cfgs.items()}
    idx = PKSampler(ds, 8, 2, "domain_aware").batch(0)
    imgs, masks, kps = InputCache(ds, MODEL["input_size"]).batch(idx)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    m, k = torch.from_numpy(masks), torch.from_numpy(kps)

    def step(model):
        def run():
            model.train()
            model(x, m, k).pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    # ratio = time(B) / time(A): A = LoRA, B = full
    ratio = paired_ratio(step(models["lora"]), step(models["full"]), pairs=args.pairs)

    sampler_runs = []
    test4 = read_folder(work / "test4", missing_domain="keep", min_images=1)
    protos4 = [f"{d}->vis" for d in IR_DOMAINS]
    for seed in args.seeds:
        for kind in ("domain_aware", "random"):
            cfg = FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(work / "pool4"), adaptation="full",
                                 output_dir=str(work / f"sampler_{kind}_{seed}"), sampler=kind,
                                 p=8, k=1 if kind == "domain_aware" else 4, lr=args.lr_full, warmup_steps=5,
                                 max_steps=args.steps, ckpt_every=10_000, seed=seed)
            s = finetune(cfg)
            res = evaluate_cross_domain(s.pop("model"), test4, protos4, ("global",))["global"]
            per = {p: res[p]["image"]["top1"] for p in protos4}
            sampler_runs.append({"sampler": kind, "seed": seed, **per, "spread": max(per.values()) - min(per.values()),
                                 "mean": float(np.mean(list(per.values())))})
            print(sampler_runs[-1])

    def mean_of(ad: str, n: int, key: str = "image_rank1") -> float:
        return float(statistics.mean(r[key] for r in runs if r["adaptation"] == ad and r["subjects"] == n))

    heads = {"pretrained_rank1": headline(base_res["image_rank1"], unit="%",
                                          note="vis-only pre-trained model, held-out vis<->ir per-image rank-1")}
    for n in args.subjects:
        lo, fu = mean_of("lora", n), mean_of("full", n)
        heads[f"lora_minus_full_{n}"] = headline(lo - fu, unit="points",
                                                 note=f"rank-1 LoRA {lo:.1f} vs full {fu:.1f} at {n} subjects")
    heads["full_over_lora_step_time"] = ratio.summary(unit="x", note="seconds per step full / LoRA, paired")
    for kind in ("domain_aware", "random"):
        rows = [r for r in sampler_runs if r["sampler"] == kind]
        heads[f"{kind}_spread"] = headline(statistics.mean(r["spread"] for r in rows), unit="points",
                                           note=f"max - min rank-1 over {', '.join(protos4)}")
    rec.write(heads, details={"pretrained": base_res, "runs": runs, "sampler_runs": sampler_runs,
                              "pretrain_seconds_per_step": pre_summary["seconds_per_step"], "work": str(work)})


if __name__ == "__main__":
    main()
