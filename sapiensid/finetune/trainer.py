"""Fine-tune SapiensID on a labelled multi-domain set, top to bottom.

``finetune(cfg)``: data -> base model -> adaptation (full / LoRA) -> loss -> optimizer -> resume -> loop ->
final checkpoint. The optimizer groups, the warm-up + cosine schedule and the checkpoint commit rule (write to
a temporary folder, ``DONE`` last, rename, prune) are :mod:`sapiensid.train`'s. The sampler and the
augmentation draw from ``(seed, step)``, and the torch RNG state is checkpointed, so stopping and resuming
reproduces the uninterrupted loss trajectory.

Output (``output_dir``): ``checkpoints/step_*/{state.pt, DONE}``, ``final/model.pt`` (a plain checkpoint in
the training layout, LoRA merged: ``webbody evaluate --checkpoint`` reads it), ``final/adapter/`` (LoRA only:
peft ``save_pretrained``), ``finetune_summary.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sapiensid.data.transforms import AugmentConfig
from sapiensid.finetune.adapt import (
    ADAPTATIONS,
    apply_lora,
    base_of,
    load_base,
    merge_lora,
    parameter_counts,
    set_train_mode,
)
from sapiensid.finetune.config import FinetuneConfig
from sapiensid.finetune.data import DomainDataset, InputCache, KeypointFn, read_folder
from sapiensid.finetune.llcm import read_llcm
from sapiensid.finetune.losses import FinetuneLoss
from sapiensid.finetune.samplers import PKSampler
from sapiensid.train import CHECKPOINT_DIR, commit_checkpoint, finished_checkpoints, lr_factor, param_groups

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    from schemas.devices import resolve_device as resolve

    return torch.device(resolve(name, "finetune.device"))


def load_datasets(cfg: FinetuneConfig) -> tuple[DomainDataset, DomainDataset | None]:
    """(train set, held-out evaluation set or None) per ``cfg.data``."""
    if cfg.data == "llcm":
        train = read_llcm(cfg.train_root, "train", cfg.missing_domain, cfg.min_images)
        # evaluation keeps every test identity (a probe without a gallery image simply finds no match)
        test = read_llcm(cfg.train_root, "test", "keep", 1)
        return train, test
    if cfg.data != "folder":
        raise ValueError(f"unknown data kind {cfg.data!r}; use 'folder' or 'llcm'")
    if not cfg.train_root:
        raise ValueError("finetune config: train_root is empty")
    train = read_folder(cfg.train_root, cfg.domains, cfg.missing_domain, cfg.min_images)
    test = read_folder(cfg.eval_root, cfg.domains or train.domains, "keep", 1) if cfg.eval_root else None
    return train, test


def build_model(cfg: FinetuneConfig) -> nn.Module:
    if cfg.adaptation not in ADAPTATIONS:
        raise ValueError(f"unknown adaptation {cfg.adaptation!r}; use one of {ADAPTATIONS}")
    model = load_base(cfg.base_checkpoint, cfg.base_model, cfg.model_overrides)
    if cfg.adaptation == "lora":
        return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    return model


def fingerprint(cfg: FinetuneConfig, model: nn.Module, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    keys = ("base_checkpoint", "adaptation", "lora_rank", "lora_alpha", "lora_targets", "classifier", "sampler",
            "p", "k", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, "model_config": base_of(model).config.to_dict(),
            "num_classes": num_classes}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if cfg_is_lora(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return base_of(model).state_dict()


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if cfg_is_lora(model):
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, state)
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"adapter state has unexpected keys: {res.unexpected_keys[:5]}")
    else:
        base_of(model).load_state_dict(state)


def cfg_is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_final(model: nn.Module, cfg: FinetuneConfig, step: int, num_classes: int, out: Path) -> Path:
    """``final/model.pt`` (merged, plain) and, for LoRA, ``final/adapter/`` written apart."""
    final = out / "final"
    tmp = out / ".tmp_final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain = merge_lora(model)
    torch.save({"model": plain.state_dict(), "model_config": plain.config.to_dict(), "step": step,
                "num_classes": num_classes, "finetune_config": cfg.to_dict(), "world": 1}, tmp / "model.pt")
    if cfg_is_lora(model):
        model.save_pretrained(str(tmp / "adapter"))  # type: ignore[operator]
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def finetune(cfg: FinetuneConfig, keypoint_fn: KeypointFn | None = None,
             datasets: tuple[DomainDataset, DomainDataset | None] | None = None) -> dict[str, Any]:
    """Run (or resume) one fine-tuning job; returns the summary (also written to finetune_summary.json)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    ckpt_root = out / CHECKPOINT_DIR
    torch.manual_seed(cfg.seed)

    # data
    train_set, _ = datasets or load_datasets(cfg)
    sampler = PKSampler(train_set, cfg.p, cfg.k, cfg.sampler, cfg.seed)
    aug = None if cfg.augment is None else AugmentConfig(**cfg.augment)

    # model, adaptation, loss
    model = build_model(cfg).to(device)
    sapiens = base_of(model)
    sapiens.set_keep_tokens(cfg.keep_tokens)
    inputs = InputCache(train_set, sapiens.config.input_size, keypoint_fn, cfg.cache_images)
    loss_fn = FinetuneLoss(train_set.num_classes, sapiens.output_dim, cfg.classifier, cfg.cls_weight,
                           cfg.triplet_margin, cfg.triplet_weight, cfg.adaface_m, seed=cfg.seed).to(device)
    counts = parameter_counts(model)
    log.info("fine-tuning %s: %d of %d parameters trainable", cfg.adaptation, counts["trainable"], counts["total"])

    # optimizer: AdamW groups of sapiensid.train; the new classifier learns faster than the pre-trained body
    groups = [dict(g, lr_mult=1.0) for g in param_groups(model, cfg.weight_decay)]
    groups += [dict(g, lr_mult=cfg.head_lr_mult) for g in param_groups(loss_fn, cfg.weight_decay)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)

    # resume
    step, history = 0, []
    fp = fingerprint(cfg, model, train_set.num_classes)
    done = finished_checkpoints(ckpt_root) if cfg.resume else []
    if done:
        state = torch.load(done[-1] / "state.pt", map_location=device, weights_only=True)
        if state["fingerprint"] != json.loads(json.dumps(fp)):
            raise ValueError(f"{done[-1]} was written by another fine-tuning setup ({state['fingerprint']}); "
                             f"this run is {fp}: use another output_dir or resume: false")
        load_trainable_state(model, state["trainable"])
        loss_fn.load_state_dict(state["loss"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, history = int(state["step"]), list(state["history"])
        log.info("resumed from %s at step %d", done[-1], step)

    # loop
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    t0, steps_run = time.time(), 0
    while step < stop:
        idx = sampler.batch(step)
        rng = np.random.default_rng((cfg.seed, step, 11))
        imgs, masks, kps = inputs.batch(idx, rng, aug)
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        labels = torch.from_numpy(train_set.labels[idx]).to(device)
        domains = torch.from_numpy(train_set.domain_ids[idx]).to(device)
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]

        set_train_mode(model, True)
        loss_fn.train()
        emb = model(x, torch.from_numpy(masks).to(device), torch.from_numpy(kps).to(device))
        loss, stats = loss_fn(emb, labels, domains)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip))
        opt.step()
        step += 1
        steps_run += 1
        history.append({"step": step, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm, **stats})
        if step % cfg.log_every == 0 or step == stop:
            rec = history[-1]
            log.info("step %d loss %.4f triplet %.4f hard+ cross-domain %.2f hard- same-domain %.2f", step,
                     rec["loss"], rec.get("triplet_loss", float("nan")), rec.get("hard_pos_cross_domain", float("nan")),
                     rec.get("hard_neg_same_domain", float("nan")))
        if step % cfg.ckpt_every == 0 or step == stop:
            tmp = ckpt_root / f".tmp_step_{step:08d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"trainable": trainable_state(model), "loss": loss_fn.state_dict(), "optimizer": opt.state_dict(),
                        "torch_rng": torch.get_rng_state(), "step": step, "history": history, "fingerprint": fp},
                       tmp / "state.pt")
            commit_checkpoint(tmp, ckpt_root, step, cfg.keep_checkpoints)
    elapsed = time.time() - t0

    set_train_mode(model, False)
    final = save_final(model, cfg, step, train_set.num_classes, out) if step >= cfg.max_steps else None
    summary = {
        "step": step, "final": str(final) if final else None, "adaptation": cfg.adaptation, **counts,
        "seconds_per_step": elapsed / steps_run if steps_run else None,
        "final_loss": history[-1]["loss"] if history else None,
        "train_identities": train_set.num_classes, "train_images": len(train_set), "data_report": train_set.report,
        "no_keypoints": inputs.no_keypoints,
        "mining": {k: float(np.mean([h[k] for h in history[-20:]])) for k in ("hard_pos_cross_domain",
                   "hard_neg_same_domain", "triplet_active") if history and k in history[-1]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_summary.json").write_text(json.dumps(summary, indent=2))
    summary["model"] = model
    return summary
