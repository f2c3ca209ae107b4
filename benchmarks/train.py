"""Training throughput of SapiensID on this machine, and whether the shard loader keeps up.

Measures (CPU unless CUDA is present):
- trainer samples/s (forward + AdaFace/Partial FC + backward + AdamW) for each preset, with MRM (the default
  keep count, int(n_candidates * 0.34)) and without (every candidate token kept);
- loader samples/s (decode + augment + foreground mask + 22 keypoints) from generated WebBody shards, per
  number of loader workers, at each preset's input size.

Prints a markdown table and writes benchmarks/results/train.json.
Usage: python benchmarks/train.py [--presets small,base] [--steps 3] [--batch small=32,base=4] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.runtime import ensure_offline_env  # noqa: E402
from sapiensid.config import SapiensIDConfig  # noqa: E402
from sapiensid.data import BatchPlan, StreamLoader, StreamSpec, to_model_inputs  # noqa: E402
from sapiensid.data.synthetic import write_shards  # noqa: E402
from sapiensid.loss import PartialFCAdaFace  # noqa: E402
from sapiensid.masking import default_keep_count  # noqa: E402
from sapiensid.model import SapiensID  # noqa: E402
from sapiensid.train import param_groups  # noqa: E402


def trainer_rate(preset: str, batch: dict, keep: int, steps: int, device: torch.device) -> dict:
    cfg = SapiensIDConfig.preset(preset)
    model = SapiensID(cfg).to(device).train()
    head = PartialFCAdaFace(1000, cfg.output_dim, sample_rate=0.1).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05) + param_groups(head, 0.05), lr=1e-4)
    images, masks, ldmks = to_model_inputs(batch, device)
    labels = batch["labels"].to(device)
    bf16 = device.type == "cuda"
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(images, masks, ldmks, n_keep=keep)
        loss, _ = head(emb.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    n = len(labels)
    return {"preset": preset, "batch": n, "keep_tokens": keep, "step_s": round(step, 3),
            "samples_per_s": round(n / step, 2), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def loader_rate(shards: list[str], size: int, workers: int, batch: int, n_batches: int) -> dict:
    spec = StreamSpec(shards, size, BatchPlan(batch), shuffle_buffer=100, seed=0, num_classes=None)
    loader = StreamLoader(spec, workers=workers)
    next(loader)  # start-up (worker spawn) is not throughput
    t = time.perf_counter()
    n = sum(len(next(loader)["labels"]) for _ in range(n_batches))
    dt = time.perf_counter() - t
    loader.close()
    return {"input_size": size, "workers": workers, "samples_per_s": round(n / dt, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--batch", default="tiny=32,small=32,base=4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--loader-batches", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train.json"))
    args = ap.parse_args()
    ensure_offline_env()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_of = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(","))}
    presets = [p for p in args.presets.split(",") if p]
    rows_train, rows_loader = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(tmp, n_identities=20, per_identity=20, samples_per_shard=100)
        for preset in presets:
            cfg = SapiensIDConfig.preset(preset)
            b = batch_of.get(preset, 8)
            spec = StreamSpec(shards, cfg.input_size, BatchPlan(b), shuffle_buffer=1, seed=0, num_classes=None)
            batch = next(StreamLoader(spec, workers=0))
            for label, keep in (("MRM", default_keep_count(cfg.n_candidates, cfg.mask_ratio)),
                                ("no MRM", cfg.n_candidates)):
                r = trainer_rate(preset, batch, keep, args.steps, device)
                r["mode"] = label
                rows_train.append(r)
                print(f"trainer {preset:5s} {label:6s} batch {r['batch']:3d}: {r['samples_per_s']:8.2f} samples/s",
                      flush=True)
        sizes = sorted({SapiensIDConfig.preset(p).input_size for p in presets})
        for size in sizes:
            for w in (int(x) for x in args.workers.split(",")):
                r = loader_rate(shards, size, w, 32, args.loader_batches)
                rows_loader.append(r)
                print(f"loader  size {size} workers {w}: {r['samples_per_s']:8.1f} samples/s", flush=True)
    need = {r["input_size"]: 0.0 for r in rows_loader}
    for r in rows_train:
        s = SapiensIDConfig.preset(r["preset"]).input_size
        need[s] = max(need[s], r["samples_per_s"])
    lines = ["| preset | mode | batch | keep tokens | params (M) | step (s) | samples/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['mode']} | {r['batch']} | {r['keep_tokens']} | {r['params_m']} | {r['step_s']} "
              f"| {r['samples_per_s']} |" for r in rows_train]
    lines += ["", "| input | loader workers | loader samples/s | fastest trainer needs | keeps up |", "|---|---|---|---|---|"]
    lines += [f"| {r['input_size']} | {r['workers']} | {r['samples_per_s']} | {need[r['input_size']]} "
              f"| {'yes' if r['samples_per_s'] >= need[r['input_size']] else 'no'} |" for r in rows_loader]
    table = "\n".join(lines)
    print(table)
    out = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": str(device), "torch_threads": torch.get_num_threads(),
                    # Shared machines: a high load average means the figures are lower bounds.
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "trainer": rows_train, "loader": rows_loader, "trainer_need_samples_per_s": need, "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
