"""Fine-tuning on a new domain, on the generated multi-domain set (tiny preset, CPU).

1. Pre-train the tiny model on the visible domain only (its own identities).
2. LoRA vs full fine-tuning at 8, 16, 32 and 96 training subjects (domain-aware sampling, vis + ir): held-out
   cross-domain rank-1 (per-image and template, vis->ir and ir->vis, identities never seen in training),
   trainable parameters, seconds per step. Per-step time full / LoRA is also measured as a paired ratio
   (interleaved steps of both, same batch).
3. Domain-aware vs random P x K sampling (full fine-tuning) with four domains (vis, swir, mwir, lwir): rank-1
   per query domain -> vis gallery, and the spread (max - min) across the three infrared-like domains.

Every fine-tuning run of steps 2-3 is repeated per seed (the seed drives the classifier's init, the sampler and
the augmentation; the pre-trained model and the data are the same for all seeds). The work is split into tasks
(per seed: LoRA + full at each subject count, and the sampler pair), run seed-major by ``--jobs`` parallel
single-threaded processes (their per-step seconds then include the contention between them; the paired
step-time ratio is measured before they start). With ``--budget-min`` a task that would end past the budget
(estimated from the tasks already done) is not started, and the JSON lists it under ``not_run``. Headlines are
means over the seeds that ran, with the min and max over seeds beside them. The pre-trained model is reused when
``--work`` already holds it (a re-run after an interruption).

Writes ``benchmarks/results/finetune.json``; docs/benchmarks.md renders it.

Usage: python benchmarks/finetune.py [--steps 150] [--pretrain-steps 80] [--subjects 8 16 32 96]
       [--seeds 0 1 2] [--jobs 2] [--budget-min 40]
"""

from __future__ import annotations

import argparse
import json
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
PROTOCOLS = ["vis->ir", "ir->vis"]
PROTOCOLS4 = [f"{d}->vis" for d in IR_DOMAINS]
# The new classifier starts from scratch in both arms, so it learns at one rate in both (the config default
# for full fine-tuning, 2e-3 x 10); only the body's learning rate differs between LoRA and full.
HEAD_LR = 2e-2


def _subset(root: Path, out: Path, n: int) -> Path:
    """A view of the first `n` identities of a generated set (symlinks, no copies)."""
    if out.exists():
        return out
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


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(statistics.mean(values)), "min": float(min(values)), "max": float(max(values))}


def _write_data(work: Path, args: argparse.Namespace) -> None:
    if (work / "DATA_DONE").exists():
        return
    write_multidomain(work / "pre", range(0, 24), 10, ("vis",), size=64)
    write_multidomain(work / "pool", range(1000, 1000 + max(args.subjects)), args.per_domain, ("vis", "ir"), size=64)
    write_multidomain(work / "test", range(5000, 5000 + args.test_subjects), args.test_per_domain, ("vis", "ir"),
                      size=64, image_seed=1)
    write_multidomain(work / "pool4", range(2000, 2000 + args.sampler_subjects), args.per_domain,
                      ("vis",) + IR_DOMAINS, size=64)
    write_multidomain(work / "test4", range(6000, 6000 + args.test_subjects), args.test_per_domain,
                      ("vis",) + IR_DOMAINS, size=64, image_seed=1)
    (work / "DATA_DONE").write_text("")


def _progress(work: Path, row: dict) -> None:
    """Print a finished run and append it to ``progress.jsonl`` (what an interrupted run leaves)."""
    print(json.dumps(row), flush=True)
    with open(work / "progress.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _task(seed: int, unit: int | str, args: argparse.Namespace, work: Path, base_ckpt: str, test,
          test4) -> tuple[list, list]:
    """One unit of work of one seed: LoRA and full at `unit` subjects, or (unit "sampler") both samplers."""
    torch.set_num_threads(1)
    lr = {"lora": args.lr_lora, "full": args.lr_full}
    runs, sampler_runs = [], []
    if unit != "sampler":
        n = int(unit)
        root = _subset(work / "pool", work / f"pool_{n}", n)
        for ad in ("lora", "full"):
            cfg = FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(root), output_dir=str(work / f"{ad}_{n}_{seed}"),
                                 adaptation=ad, p=8, k=args.k, lr=lr[ad], head_lr_mult=HEAD_LR / lr[ad],
                                 warmup_steps=5, max_steps=args.steps, ckpt_every=10_000, seed=seed, resume=False)
            s = finetune(cfg)
            r = _rank1(evaluate_cross_domain(s.pop("model"), test, PROTOCOLS, ("global",)), PROTOCOLS)
            runs.append({"subjects": n, "adaptation": ad, "seed": seed, **r, "trainable": s["trainable"],
                         "s_per_step": round(s["seconds_per_step"], 3), "final_loss": round(s["final_loss"], 3)})
            _progress(work, runs[-1])
        return runs, sampler_runs
    for kind in ("domain_aware", "random"):
        cfg = FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(work / "pool4"), adaptation="full",
                             output_dir=str(work / f"sampler_{kind}_{seed}"), sampler=kind,
                             # the same P and images per identity on both sides: K x 4 domains vs 4K
                             p=args.sampler_p, k=args.k if kind == "domain_aware" else 4 * args.k, lr=args.lr_full,
                             head_lr_mult=HEAD_LR / args.lr_full, warmup_steps=5,
                             max_steps=args.steps, ckpt_every=10_000, seed=seed, resume=False)
        s = finetune(cfg)
        res = evaluate_cross_domain(s.pop("model"), test4, PROTOCOLS4, ("global",))["global"]
        per = {p: res[p]["image"]["top1"] for p in PROTOCOLS4}
        sampler_runs.append({"sampler": kind, "seed": seed, **per, "spread": max(per.values()) - min(per.values()),
                             "mean": float(np.mean(list(per.values()))),
                             "s_per_step": round(s["seconds_per_step"], 3)})
        _progress(work, sampler_runs[-1])
    return runs, sampler_runs


def _run_tasks(tasks: list[tuple[int, int | str]], args: argparse.Namespace, work: Path, base_ckpt: str, test,
               test4, t0: float) -> tuple[list, list, list]:
    """Run the tasks in order (``--jobs`` processes); with ``--budget-min`` a task that would end past the budget
    (estimated from the median wall time of the tasks done) is not started. Returns (runs, sampler runs, the
    tasks that did not run)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    runs: list[dict] = []
    sampler_runs: list[dict] = []
    durations: list[float] = []
    skipped: list[tuple[int, int | str]] = []
    budget = None if args.budget_min is None else 60 * args.budget_min
    # spawn: no fork of a process that already runs torch threads
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = list(tasks)
        running: dict = {}
        while pending or running:
            while pending and len(running) < args.jobs:
                if budget is not None and durations and time.time() - t0 + statistics.median(durations) > budget:
                    print(f"not started (over the {args.budget_min} min budget): {pending}", flush=True)
                    skipped, pending = pending, []
                    break
                task = pending.pop(0)
                running[pool.submit(_task, *task, args, work, base_ckpt, test, test4)] = (task, time.time())
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                task, started = running.pop(fut)
                r, s = fut.result()
                runs += r
                sampler_runs += s
                durations.append(time.time() - started)
    return runs, sampler_runs, skipped


def _step_time_ratio(work: Path, base_ckpt: str, pairs: int, k: int):
    """Paired seconds per training step (forward + backward), full / LoRA, on the same batch."""
    root = work / "pool_16" if (work / "pool_16").exists() else work / "pool"
    models = {ad: build_model(FinetuneConfig(base_checkpoint=base_ckpt, train_root=str(root), adaptation=ad))
              for ad in ("lora", "full")}
    ds = read_folder(root)
    idx = PKSampler(ds, 8, k, "domain_aware").batch(0)
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
    return paired_ratio(step(models["lora"]), step(models["full"]), pairs=pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--pretrain-steps", type=int, default=80)
    ap.add_argument("--subjects", type=int, nargs="+", default=[8, 16, 32, 96])
    ap.add_argument("--sampler-subjects", type=int, default=16)
    ap.add_argument("--k", type=int, default=2, help="images per identity and domain (domain-aware, P = 8)")
    ap.add_argument("--sampler-p", type=int, default=8, help="identities per batch in the sampler runs")
    ap.add_argument("--per-domain", type=int, default=5)
    ap.add_argument("--test-subjects", type=int, default=16)
    ap.add_argument("--test-per-domain", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-min", type=float, default=None, help="start no task that would end past this")
    ap.add_argument("--lr-full", type=float, default=2e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-2)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1, help="tasks run in parallel, one process each")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rec = Recorder("finetune", args)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_finetune_"))
    t0 = time.time()
    _write_data(work, args)
    print(f"data written in {time.time() - t0:.0f} s", flush=True)

    pre = FinetuneConfig(base_model="tiny", model_overrides=MODEL, train_root=str(work / "pre"),
                         output_dir=str(work / "pretrain"), adaptation="full", p=8, k=4, lr=3e-3, warmup_steps=5,
                         max_steps=args.pretrain_steps, ckpt_every=10_000)  # resume: a re-run reuses it
    pre_summary = finetune(pre)
    base_model = pre_summary.pop("model")
    base_ckpt = str(work / "pretrain" / "final" / "model.pt")
    test = read_folder(work / "test", missing_domain="keep", min_images=1)
    test4 = read_folder(work / "test4", missing_domain="keep", min_images=1)
    base_res = _rank1(evaluate_cross_domain(base_model, test, PROTOCOLS, ("global",)), PROTOCOLS)
    res4 = evaluate_cross_domain(base_model, test4, PROTOCOLS4, ("global",))["global"]
    base4 = {p: res4[p]["image"]["top1"] for p in PROTOCOLS4}
    print(f"pre-trained (vis only): {base_res} {base4}", flush=True)

    ratio = _step_time_ratio(work, base_ckpt, args.pairs, args.k)
    # seed-major order, so that a budget cut leaves whole seeds first
    tasks = [(seed, unit) for seed in args.seeds for unit in [*args.subjects, "sampler"]]
    runs, sampler_runs, not_run = _run_tasks(tasks, args, work, base_ckpt, test, test4, t0)
    seeds_run = sorted({r["seed"] for r in runs} | {r["seed"] for r in sampler_runs})

    summary = []
    for n in args.subjects:
        for ad in ("lora", "full"):
            rows = [r for r in runs if r["adaptation"] == ad and r["subjects"] == n]
            if not rows:
                continue
            rank = _spread([r["image_rank1"] for r in rows])
            summary.append({"subjects": n, "adaptation": ad, "seeds": len(rows), "rank1_mean": rank["mean"],
                            "rank1_min": rank["min"], "rank1_max": rank["max"],
                            "template_rank1_mean": statistics.mean(r["template_rank1"] for r in rows),
                            "gain_over_pretrained": rank["mean"] - base_res["image_rank1"],
                            "trainable": rows[0]["trainable"],
                            "s_per_step_median": statistics.median(r["s_per_step"] for r in rows)})
    sampler_summary = []
    for kind in ("domain_aware", "random"):
        rows = [r for r in sampler_runs if r["sampler"] == kind]
        if rows:
            sampler_summary.append({"sampler": kind, "seeds": len(rows),
                                    **{p: statistics.mean(r[p] for r in rows) for p in PROTOCOLS4},
                                    "spread_mean": statistics.mean(r["spread"] for r in rows),
                                    "spread_min": min(r["spread"] for r in rows),
                                    "spread_max": max(r["spread"] for r in rows),
                                    "mean": statistics.mean(r["mean"] for r in rows)})

    heads = {"pretrained_rank1": headline(base_res["image_rank1"], unit="%",
                                          note="vis-only pre-trained model, held-out vis<->ir per-image rank-1; "
                                               f"chance {100 / args.test_subjects:.2f} %")}
    for row in summary:
        n, ad = row["subjects"], row["adaptation"]
        heads[f"{ad}_rank1_{n}"] = headline(row["rank1_mean"], row["rank1_min"], row["rank1_max"], unit="%",
                                            note=f"{ad}, {n} subjects, mean (min .. max) over {row['seeds']} seed(s)")
    for n in args.subjects:
        by = {(r["adaptation"], r["seed"]): r["image_rank1"] for r in runs if r["subjects"] == n}
        diffs = [by[("lora", sd)] - by[("full", sd)] for sd in seeds_run if ("lora", sd) in by and ("full", sd) in by]
        if diffs:
            d = _spread(diffs)
            heads[f"lora_minus_full_{n}"] = headline(d["mean"], d["min"], d["max"], unit="points",
                                                     note=f"per-seed rank-1 LoRA - full at {n} subjects, "
                                                          f"{len(diffs)} seed(s)")
    heads["full_over_lora_step_time"] = ratio.summary(unit="x", note="seconds per step full / LoRA, paired")
    for row in sampler_summary:
        heads[f"{row['sampler']}_spread"] = headline(
            row["spread_mean"], row["spread_min"], row["spread_max"], unit="points",
            note=f"max - min rank-1 over {', '.join(PROTOCOLS4)}, {row['seeds']} seed(s)")
    rec.write(heads, details={"pretrained": base_res, "pretrained_4domains": base4, "seeds_run": seeds_run,
                              "not_run": [list(t) for t in not_run], "summary": summary,
                              "sampler_summary": sampler_summary, "runs": runs, "sampler_runs": sampler_runs,
                              "pretrain_seconds_per_step": pre_summary["seconds_per_step"], "work": str(work)})


if __name__ == "__main__":
    main()
