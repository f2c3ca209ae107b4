"""The model to fine-tune: the base checkpoint, then full fine-tuning or LoRA adapters through peft.

* ``load_base``: a WebBody training checkpoint (run dir, ``step_*`` dir or ``model.pt``: it carries its model
  config) or a released SapiensID state dict (``.pth``/``.pt``/``.safetensors``, loaded strictly into the
  preset named in the config). Another architecture gives :class:`CheckpointMismatchError` naming the keys,
  or a ValueError naming both configurations.
* ``full``: every parameter that requires grad is trained (the frozen sin-cos PE stays frozen).
* ``lora``: ``peft.get_peft_model`` with a ``LoraConfig`` on the backbone's self-attention projections
  (``attn.qkv``, ``attn.proj``; rank, alpha, dropout and target modules configurable). The base is frozen and
  its BatchNorm statistics are not updated (:func:`set_train_mode`), so its weights stay bit-identical. Adapters
  are saved apart (``save_pretrained``) and ``merge_lora`` folds them into a plain :class:`SapiensID`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sapiensid.checkpoint import CheckpointMismatchError
from sapiensid.config import SapiensIDConfig
from sapiensid.model import SapiensID, load_sapiensid_weights

ADAPTATIONS = ("full", "lora")
DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj")


def _webbody_checkpoint(path: Path) -> Path | None:
    """The model.pt of a WebBody training checkpoint at `path`, or None if `path` is something else."""
    from sapiensid.train import resolve_checkpoint

    main = resolve_checkpoint(path)
    return main if main.name == "model.pt" and main.is_file() else None


def load_base(checkpoint: str | Path | None, preset: str | None, overrides: dict[str, Any] | None = None) -> SapiensID:
    """The pre-trained model (see the module docstring). `checkpoint` None: random init of `preset`."""
    wanted = SapiensIDConfig.preset(preset, **(overrides or {})) if preset else None
    if checkpoint is None or checkpoint == "":
        if wanted is None:
            raise ValueError("no base checkpoint and no model preset: set base_checkpoint or base_model")
        return SapiensID(wanted)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"base checkpoint not found: {path}")
    main = _webbody_checkpoint(path)
    if main is not None:
        state = torch.load(main, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model_config" not in state:
            raise ValueError(f"{main}: not a WebBody training checkpoint (no model_config)")
        have = SapiensIDConfig.from_dict(state["model_config"])
        if wanted is not None and have != wanted:
            diff = {k: (v, getattr(wanted, k)) for k, v in have.to_dict().items() if getattr(wanted, k) != v}
            raise ValueError(f"{main} holds another architecture than base_model={preset!r}: "
                             f"(checkpoint, config) differ in {diff}; drop base_model to use the checkpoint's")
        model = SapiensID(have)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointMismatchError([], [], [], f"{main}: {exc}") from exc
        return model
    if wanted is None:
        raise ValueError(f"{path} is a released state dict: set base_model to its preset (e.g. base)")
    return load_sapiensid_weights(SapiensID(wanted), path)


def apply_lora(model: SapiensID, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> nn.Module:
    """Wrap `model` in a peft LoRA model; only the adapter matrices require grad."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"LoRA target module {t!r} matches no Linear layer of the model")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def base_of(model: nn.Module) -> SapiensID:
    """The SapiensID inside (the peft wrapper's base model, or `model` itself)."""
    if is_lora(model):
        return model.get_base_model()  # type: ignore[operator,return-value]
    assert isinstance(model, SapiensID)
    return model


def set_train_mode(model: nn.Module, training: bool) -> None:
    """Train/eval; with LoRA the frozen base's BatchNorm layers stay in eval (running stats untouched)."""
    model.train(training)
    if training and is_lora(model):
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def merge_lora(model: nn.Module) -> SapiensID:
    """A plain SapiensID with the adapters folded into the base weights (a copy: `model` is left as is)."""
    import copy

    if not is_lora(model):
        return base_of(model)
    return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator,return-value]
