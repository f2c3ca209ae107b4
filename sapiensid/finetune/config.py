"""Fine-tuning configuration (the ``finetune:`` section of a YAML, see configs/finetune*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from sapiensid.config import SectionConfig


@dataclass
class FinetuneConfig(SectionConfig):
    SECTION: ClassVar[str] = "finetune"

    # base model: a WebBody training checkpoint (run dir / step dir / model.pt) or a released state dict
    base_checkpoint: str | None = None
    base_model: str | None = None  # preset (base/small/tiny): needed for released weights or a random init
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data: "folder" (ROOT/<domain>/<identity>/<image>) or "llcm" (train_root = the LLCM folder)
    data: str = "folder"
    train_root: str = ""
    eval_root: str | None = None  # folder: held-out identities in the same layout; llcm: ignored (test lists)
    domains: list[str] | None = None  # None: every domain folder (folder) / vis, nir (llcm)
    missing_domain: str = "drop"  # an identity lacking a domain: "drop" or "keep" (counted either way)
    min_images: int = 2
    cache_images: bool = True
    # images without keypoints: the flow computes them with this pose model (the persons stage's Ultralytics
    # pose weights; a path or asset:NAME) and writes ROOT/keypoints.json; None leaves them missing
    pose_model: str | None = None
    output_dir: str = "runs/finetune"
    # adaptation
    adaptation: str = "lora"  # "full" or "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    # losses
    classifier: str = "ce"  # "ce", "adaface" or "none"
    cls_weight: float = 1.0
    triplet_margin: float = 0.0
    triplet_weight: float = 1.0
    adaface_m: float = 0.4
    # sampling
    sampler: str = "domain_aware"  # or "random"
    p: int = 8  # identities per batch
    k: int = 2  # images per identity (domain_aware: per identity and domain)
    augment: dict[str, Any] | None = field(default_factory=lambda: {"crop_prob": 0.0, "color_prob": 0.3})
    keep_tokens: int | None = None  # MRM keep count in training; None keeps every valid token
    # optimisation (AdamW + warm-up/cosine of sapiensid.train)
    lr: float = 1e-4
    head_lr_mult: float = 10.0  # classifier learning rate = lr x this (it starts from scratch)
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.05
    warmup_steps: int = 10
    max_steps: int = 200
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = True
    stop_after: int | None = None  # stop at this step (the schedule still runs to max_steps)
    # evaluation
    protocols: list[str] | None = None  # e.g. ["vis->ir", "ir->vis"]; None: every ordered pair of domains
    features: list[str] = field(default_factory=lambda: ["global", "global_parts"])
    eval_batch_size: int = 64
    evaluate_base: bool = True  # also evaluate the model before fine-tuning
