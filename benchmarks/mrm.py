"""MRM speed-up: forward+backward time per sample of SapiensID-base with all candidate tokens vs MRM.

Both settings run in one process on CPU, interleaved (A, B, A, B, ...) so machine load hits both alike:

* ``all``: every one of the 432 candidates is kept (434 tokens with CLS and the mask token);
* ``mrm``: the paper's keep count int(432 * 0.34) = 146 (+ CLS + 1 mask token = 148 tokens).

FLOPs of one forward+backward are counted with ``torch.utils.flop_counter`` (matmuls, attention);
the measured speed-up is reported beside the FLOP ratio. Writes ``benchmarks/results/mrm.json``.

Usage: python benchmarks/mrm.py [--batch 2] [--repeats 3] [--preset base] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sapiensid.masking import default_keep_count  # noqa: E402
from sapiensid.model import SapiensID, SapiensIDConfig  # noqa: E402


def person_keypoints(batch: int) -> torch.Tensor:
    """A standing person: 17 body points + 5 face landmarks, normalised to the square input."""
    base = torch.tensor(
        [[0.50, 0.20], [0.53, 0.18], [0.47, 0.18], [0.56, 0.20], [0.44, 0.20], [0.62, 0.32], [0.38, 0.32],
         [0.66, 0.45], [0.34, 0.45], [0.67, 0.57], [0.33, 0.57], [0.58, 0.60], [0.42, 0.60], [0.58, 0.77],
         [0.42, 0.77], [0.58, 0.93], [0.42, 0.93], [0.53, 0.185], [0.47, 0.185], [0.50, 0.21], [0.525, 0.235],
         [0.475, 0.235]]
    )
    return base.expand(batch, -1, -1).clone()


def step(model: SapiensID, inputs: tuple, n_keep: int) -> None:
    out = model(*inputs, n_keep=n_keep)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def count_flops(model: SapiensID, inputs: tuple, n_keep: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, inputs, n_keep)
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch default); 1 avoids barrier stalls on a loaded machine")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mrm.json"))
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = SapiensIDConfig.preset(args.preset)
    model = SapiensID(cfg).train()
    b, s = args.batch, cfg.input_size
    inputs = (torch.rand(b, 3, s, s) * 2 - 1, torch.ones(b, s, s, dtype=torch.bool), person_keypoints(b))
    settings = {"all": cfg.n_candidates, "mrm": default_keep_count(cfg.n_candidates, cfg.mask_ratio)}

    flops = {name: count_flops(model, inputs, n) for name, n in settings.items()}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for n in settings.values():  # warm-up
        step(model, inputs, n)
    for _ in range(args.repeats):
        for name, n in settings.items():
            t0 = time.perf_counter()
            step(model, inputs, n)
            times[name].append((time.perf_counter() - t0) / b)

    per_sample = {name: statistics.median(v) for name, v in times.items()}
    speedup = per_sample["all"] / per_sample["mrm"]
    flop_ratio = flops["all"] / flops["mrm"]
    result = {
        "speedup": round(speedup, 3),
        "flop_ratio": round(flop_ratio, 3),
        "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
        "preset": args.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": b,
        "repeats": args.repeats,
        "tokens": {name: n + 2 for name, n in settings.items()},
        "sec_per_sample": {k: round(v, 4) for k, v in per_sample.items()},
        "sec_per_sample_all_runs": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "gflop_per_sample_fwd_bwd": {k: round(v / b / 1e9, 2) for k, v in flops.items()},
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"| setting | tokens | GFLOP/sample (fwd+bwd) | s/sample (median of {args.repeats}) |")
    print("|---|---|---|---|")
    for name in settings:
        print(f"| {name} | {result['tokens'][name]} | {result['gflop_per_sample_fwd_bwd'][name]} | "
              f"{result['sec_per_sample'][name]} |")
    print(f"\nmeasured speed-up {speedup:.2f}x, FLOP ratio {flop_ratio:.2f}x "
          f"({100 * speedup / flop_ratio:.0f}% of the FLOP ratio); wrote {args.out}")


if __name__ == "__main__":
    main()
