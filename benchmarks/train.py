"""Training throughput of SapiensID on this machine, and whether the shard loader keeps up with the trainer.

For each preset (CPU unless CUDA is present), one real `sapiensid.train.Trainer` on generated WebBody shards:

* ``trainer_samples_per_s_<preset>``: samples per second of the full training step (forward, AdaFace with the
  Partial FC classifier, backward, clipping, AdamW), default MRM keep count, median with min and max over
  >= 5 steps (`benchmarks.paired.repeated`);
* ``loader_over_trainer_<preset>_w<N>``: a PAIRED ratio (`benchmarks.paired.paired_ratio`, alternating order):
  A = the loader producing one batch (decode, augment, white-padding mask, 22 keypoints) with N worker
  processes, B = one trainer step on a batch of the same size; ratio = loader samples/s over trainer samples/s.
  >= 1 means the loader keeps up. With workers, the loader prefetches while the trainer runs, as in training.

Writes ``benchmarks/results/train.json``. Usage:
python benchmarks/train.py [--presets small] [--batch small=16,base=2] [--pairs 5] [--workers 0,1] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paired import Recorder, headline, paired_ratio, repeated  # noqa: E402
from pipeline.runtime import ensure_offline_env  # noqa: E402
from sapiensid.data import StreamLoader  # noqa: E402
from sapiensid.data.synthetic import write_shards  # noqa: E402
from sapiensid.train import TrainConfig, Trainer  # noqa: E402


def measure_preset(preset: str, b: int, shards: Path, tmp: Path, pairs: int, workers: list[int],
                   headlines: dict[str, dict]) -> dict:
    cfg = TrainConfig(train_shards=str(shards), output_dir=str(tmp / f"run-{preset}"), model=preset,
                      batch_size=b, keep_tokens="default", num_workers=0, shuffle_buffer=100,
                      max_steps=100_000, warmup_steps=1, tensorboard=False, progress=False, seed=0)
    trainer = Trainer(cfg)
    batch = next(trainer.loader)
    n = len(batch["labels"])
    r = repeated(lambda: trainer.train_step(batch), repeats=pairs)
    headlines[f"trainer_samples_per_s_{preset}"] = headline(
        n / r["median"], lo=n / r["max"], hi=n / r["min"], pairs=pairs, unit="samples/s",
        note=f"full train step, batch {n}, keep {batch['n_keep']} of {trainer.model_cfg.n_candidates} "
             f"tokens; median, min, max over {pairs} steps")
    row = {"batch": n, "keep_tokens": int(batch["n_keep"]), "input_size": trainer.model_cfg.input_size,
           "params_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 2),
           "step_seconds": [round(x, 4) for x in r["runs"]]}
    print(f"{preset}: trainer {n / r['median']:.2f} samples/s", flush=True)
    for w in workers:
        loader = StreamLoader(trainer.loader.spec, workers=w)
        next(loader)  # worker start-up is not throughput
        p = paired_ratio(lambda loader=loader: next(loader), lambda: trainer.train_step(batch), pairs=pairs,
                         work_a=lambda out: len(out["labels"]), work_b=lambda _: n)
        loader.close()
        headlines[f"loader_over_trainer_{preset}_w{w}"] = p.summary(
            target=">= 1", note=f"{w} loader worker(s), {trainer.model_cfg.input_size} px, batch {n}")
        row[f"loader_seconds_w{w}"] = [round(x, 4) for x in p.a_seconds]
        print(f"{preset}: loader/trainer with {w} worker(s) {p.median:.2f}", flush=True)
    trainer.loader.close()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small")
    ap.add_argument("--batch", default="tiny=32,small=16,base=2")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workers", default="0,1")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args(argv)
    ensure_offline_env()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rec = Recorder("train", args, packages=("torch", "numpy", "webdataset"))
    batch_of = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(","))}
    workers = [int(x) for x in args.workers.split(",") if x]
    headlines: dict[str, dict] = {}
    details: dict = {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch_threads": torch.get_num_threads(),
                     "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, n_identities=20, per_identity=20, samples_per_shard=100)
        for preset in [p for p in args.presets.split(",") if p]:
            details["presets"][preset] = measure_preset(preset, batch_of.get(preset, 8), shards, Path(tmp),
                                                        args.pairs, workers, headlines)
    rec.write(headlines, details, path=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
