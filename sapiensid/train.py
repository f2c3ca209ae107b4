"""SapiensID training on WebBody shards.

AdamW (no weight decay on 1-D parameters) with linear warm-up and cosine decay, scaled per step by the batch
size the variable masking rate gives; gradient clipping; bf16 autocast on GPU; AdaFace with a Partial FC
classifier; TensorBoard and a progress bar; checkpoints that resume to the exact step (model, optimizers,
schedule position, loader positions, classifier sampling generator and RNG states).

Distributed: under ``torchrun`` (or Ray Train, see :func:`train_with_ray`) every rank runs :class:`Trainer`;
the backbone is wrapped in DDP and the classifier is sharded over ranks. CPU works for small configs.

Run: ``python -m sapiensid.train CONFIG.yaml [--set key=value ...]`` (or ``webbody train``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from sapiensid.config import SapiensIDConfig, SectionConfig
from sapiensid.data import AugmentConfig, BatchPlan, StreamLoader, StreamSpec, expand_urls, to_model_inputs
from sapiensid.loss import PartialFCAdaFace
from sapiensid.masking import default_keep_count
from sapiensid.model import SapiensID
from schemas.base import upgrade_table

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainConfig(SectionConfig):
    """Everything a run needs; read from YAML (a top-level ``train:`` section or the whole file)."""

    SECTION: ClassVar[str] = "train"

    train_shards: str | list[str] = ""  # directory of bundle shards, brace pattern, glob, URL(s)
    output_dir: str = "runs/sapiensid"
    split: str = "train"
    num_classes: int | None = None  # None: read from the bundle's index.parquet / stats.json
    model: str = "small"  # SapiensIDConfig preset
    model_overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # per rank, at `keep_tokens`
    keep_tokens: int | str | None = "default"  # "default": the model's int(432 * (1 - mask_ratio)); None: no MRM
    variable_masking: bool = False  # draw the keep count per step (masking.variable_keep_count)
    min_keep: int = 64
    masking_lambda: float = 2.0
    max_batch_size: int | None = None
    num_workers: int = 2  # loader streams, one worker process each (0: in the main process)
    shuffle_buffer: int = 2000
    augment: dict[str, Any] | None = field(default_factory=dict)  # AugmentConfig fields; None disables
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 5.0
    adaface_s: float = 64.0
    adaface_m: float = 0.4
    adaface_h: float = 0.333
    adaface_t_alpha: float = 0.01
    sample_rate: float = 1.0  # Partial FC share of class centres scored per step
    bf16: bool = True  # autocast on CUDA only
    device: str = "auto"
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    resume: bool = True  # continue from the latest checkpoint in output_dir
    stop_after: int | None = None  # stop early at this step (the schedule still runs to max_steps)

    @classmethod
    def _coerce(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings, values parsed as YAML (numbers, bools, lists, null): schemas.overrides, the
    parser every WebBody CLI uses."""
    from schemas.overrides import parse_overrides as parse

    return parse(pairs)


def infer_num_classes(shards: str | list[str], split: str) -> int:
    """Identity count from the bundle's index.parquet (max class_id + 1 over `split`) or stats.json."""
    root = Path(shards if isinstance(shards, str) else shards[0])
    root = root if root.is_dir() else root.parent
    index = root / "index.parquet"
    if index.exists():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = upgrade_table(pq.read_table(index))  # a version-1 index names class_id `label`
        if "split" in table.column_names:
            table = table.filter(pc.equal(table["split"], split))
        if table.num_rows:
            return int(pc.max(table["class_id"]).as_py()) + 1
    stats = root / "stats.json"
    if stats.exists():
        data = json.loads(stats.read_text())
        for key in (f"{split}_identities", "num_identities", "identities"):
            if isinstance(data.get(key), int):
                return data[key]
    raise ValueError(f"cannot infer num_classes: no index.parquet/stats.json with labels next to {root}; set num_classes")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms and other 1-D parameters (CVLface)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rank_world() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set); no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return _rank_world()


def pick_device(name: str, local_rank: int) -> torch.device:
    """`train.device` through schemas.devices (the resolver every model uses); under torchrun each process
    takes its local rank's GPU."""
    from schemas.devices import resolve_device

    dev = resolve_device(name, "train.device")
    if dev.startswith("cuda"):
        index = local_rank if name.strip().lower() in ("auto", "cuda") else int(dev.split(":")[1])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(dev)


def finished_checkpoints(root: Path) -> list[Path]:
    """``step_*`` folders under `root` that carry ``DONE`` (fully written), oldest first."""
    return sorted(p.parent for p in root.glob("step_*/DONE")) if root.exists() else []


def commit_checkpoint(tmp: Path, root: Path, step: int, keep: int) -> Path:
    """Finish a checkpoint written into `tmp`: ``DONE`` last, atomic rename to ``step_<n>``, keep the newest
    `keep` finished ones. A crash before the rename leaves only a ``.tmp_*`` folder that resume ignores."""
    final = root / f"step_{step:08d}"
    (tmp / "DONE").write_text(json.dumps({"step": step, "time": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in finished_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed()
        self.device = pick_device(cfg.device, local_rank)
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        if not cfg.train_shards:
            raise ValueError("train config: train_shards is empty (a shard directory, pattern or URL list)")
        urls = expand_urls(cfg.train_shards, split=cfg.split)
        self.num_classes = cfg.num_classes or infer_num_classes(cfg.train_shards, cfg.split)
        self.model_cfg = SapiensIDConfig.preset(cfg.model, **cfg.model_overrides)
        self.model = SapiensID(self.model_cfg).to(self.device)
        self.head = PartialFCAdaFace(
            self.num_classes, self.model_cfg.output_dim, cfg.sample_rate, cfg.adaface_s, cfg.adaface_m,
            cfg.adaface_h, cfg.adaface_t_alpha, seed=cfg.seed,
        ).to(self.device)
        self.ddp: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.opt_model = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.opt_head = torch.optim.AdamW(param_groups(self.head, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        keep = cfg.keep_tokens
        if keep == "default":
            keep = default_keep_count(self.model_cfg.n_candidates, self.model_cfg.mask_ratio)
        self.keep_tokens: int | None = None if keep is None else int(keep)
        # the model's own keep count is the fallback of every forward without n_keep: None must reach it too,
        # or keep_tokens=None would leave the preset's default MRM on
        self.model.set_keep_tokens(self.keep_tokens)
        variable = None
        if cfg.variable_masking:
            if self.keep_tokens is None:
                raise ValueError("variable_masking needs keep_tokens (the base keep count)")
            variable = (self.model_cfg.n_candidates, cfg.min_keep, cfg.masking_lambda)
        plan = BatchPlan(cfg.batch_size, self.keep_tokens, variable, cfg.max_batch_size, seed=cfg.seed)
        aug = None if cfg.augment is None else AugmentConfig(**cfg.augment)
        spec = StreamSpec(urls, self.model_cfg.input_size, plan, aug, cfg.shuffle_buffer, cfg.seed, self.num_classes)
        self.loader = StreamLoader(spec, workers=cfg.num_workers, rank=self.rank, world=self.world)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.use_bf16 = cfg.bf16 and self.device.type == "cuda"

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def latest_checkpoint(self) -> Path | None:
        done = finished_checkpoints(self._ckpt_root())
        return done[-1] if done else None

    def save(self) -> Path:
        """Write step_<n>/ : model.pt (rank 0), rank<r>.pt (every rank), DONE last; prune old ones."""
        root = self._ckpt_root()
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        if self.rank == 0:
            torch.save(
                {
                    "model": self.model.state_dict(),
                    "model_config": self.model_cfg.to_dict(),
                    "optimizer": self.opt_model.state_dict(),
                    "step": self.step,
                    "num_classes": self.num_classes,
                    "train_config": self.cfg.to_dict(),
                    "world": self.world,
                },
                tmp / "model.pt",
            )
        torch.save(
            {
                "head": self.head.state_dict(),
                "head_optimizer": self.opt_head.state_dict(),
                "head_generator": self.head.generator.get_state(),
                "loader": self.loader.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "history": self.history,
            },
            tmp / f"rank{self.rank}.pt",
        )
        self._barrier()
        if self.rank == 0:
            commit_checkpoint(tmp, root, self.step, self.cfg.keep_checkpoints)
        self._barrier()
        return final

    def load(self, path: Path) -> None:
        main = torch.load(path / "model.pt", map_location=self.device, weights_only=True)
        if main["world"] != self.world:
            raise ValueError(f"{path} was written by {main['world']} ranks; this run has {self.world}")
        self.model.load_state_dict(main["model"])
        self.opt_model.load_state_dict(main["optimizer"])
        self.step = int(main["step"])
        mine = torch.load(path / f"rank{self.rank}.pt", map_location="cpu", weights_only=True)
        self.head.load_state_dict(mine["head"])
        self.opt_head.load_state_dict(mine["head_optimizer"])
        self.head.generator.set_state(mine["head_generator"])
        self.loader.load_state_dict(mine["loader"])
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.history = list(mine.get("history", []))
        log.info("resumed from %s at step %d", path, self.step)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg = self.cfg
        images, masks, ldmks = to_model_inputs(batch, self.device)
        labels = batch["labels"].to(self.device)
        n_keep = batch["n_keep"]
        # Variable masking: the learning rate follows the batch size of this step (masking.lr_for_keep).
        scale = len(labels) / cfg.batch_size if cfg.variable_masking else 1.0
        lr = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio) * scale
        for opt in (self.opt_model, self.opt_head):
            for group in opt.param_groups:
                group["lr"] = lr
        self.ddp.train()
        self.head.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            emb = self.ddp(images, masks, ldmks, n_keep=n_keep)
        loss, stats = self.head(emb.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        self.opt_model.zero_grad(set_to_none=True)
        self.opt_head.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.opt_model.step()
        self.opt_head.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm,
                "batch": len(labels), "n_keep": -1 if n_keep is None else int(n_keep), **stats}

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.resume and (ckpt := self.latest_checkpoint()) is not None:
            self.load(ckpt)
        stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
        writer = None
        if cfg.tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"))
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=self.step, desc="train", dynamic_ncols=True)
        t0, samples = time.time(), 0
        try:
            while self.step < stop:
                batch = next(self.loader)
                rec = self.train_step(batch)
                samples += rec["batch"]
                self.history.append({"step": rec["step"], "loss": rec["loss"]})
                if writer is not None and (self.step % cfg.log_every == 0 or self.step == stop):
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, self.step)
                    writer.add_scalar("train/skipped_samples", self.loader.skipped, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_acc']:.2f}", lr=f"{rec['lr']:.2e}")
                if self.step % cfg.ckpt_every == 0 or self.step == stop:
                    self.save()
        finally:
            self.loader.close()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        elapsed = time.time() - t0
        summary = {
            "step": self.step,
            "checkpoint": str(self.latest_checkpoint()),
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "skipped_samples": self.loader.skipped,
            "num_classes": self.num_classes,
        }
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The model file a checkpoint path names: a run dir -> its latest finished ``checkpoints/step_*/model.pt``;
    a ``step_*`` (or any) dir -> its ``model.pt``; a file -> itself. A run dir with no finished step is an error."""
    path = Path(checkpoint)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        done = finished_checkpoints(path / CHECKPOINT_DIR)
        if not done:
            raise FileNotFoundError(f"no finished checkpoint under {path / CHECKPOINT_DIR}")
        path = done[-1]
    return path / "model.pt" if path.is_dir() else path


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> SapiensID:
    """A SapiensID model from a training checkpoint directory (step_*/ or a run dir: its latest) or model.pt."""
    state = torch.load(resolve_checkpoint(checkpoint), map_location=device, weights_only=True)
    model = SapiensID(SapiensIDConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training job in this process (one rank under torchrun)."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized() and os.environ.get("WEBBODY_KEEP_PG") != "1":
            dist.destroy_process_group()


def launch_torchrun(config: str, nproc: int, overrides: list[str] | None = None) -> int:
    """Start `nproc` ranks on this machine with torchrun; returns its exit code."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sapiensid.train", config]
    for o in overrides or []:
        cmd += ["--set", o]
    return subprocess.call(cmd)


def train_with_ray(cfg: TrainConfig, num_workers: int, use_gpu: bool = False, address: str | None = None) -> dict:
    """Data-parallel training on a Ray cluster with Ray Train's TorchTrainer (each worker runs Trainer)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The caller (flows/train.py) starts Ray offline-safe; sapiensid stays free of pipeline imports.
    if not ray.is_initialized():
        ray.init(address=address or "local", include_dashboard=False)
    cfg_dict = cfg.to_dict()

    def loop(config: dict) -> None:
        os.environ["WEBBODY_KEEP_PG"] = "1"  # Ray Train owns the process group
        summary = train(TrainConfig.from_dict(config))
        import ray.train

        ray.train.report(summary)

    trainer = TorchTrainer(
        loop, train_loop_config=cfg_dict,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(Path(cfg.output_dir).resolve() / "ray"), name="sapiensid"),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train SapiensID on WebBody shards")
    parser.add_argument("config", help="YAML with a train: section (or the train fields at top level)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(args.config, parse_overrides(args.set))
    summary = train(cfg)
    if _rank_world()[0] == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
