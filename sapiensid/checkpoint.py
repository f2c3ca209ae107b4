"""Strict, safe checkpoint reading for the released SapiensID and CVLface models.

* Files are read with ``torch.load(weights_only=True)`` or safetensors only: no arbitrary pickles.
* Both official layouts are accepted: a flat state dict (``net.*``) or a training checkpoint
  ``{"model_state_dict": {"model.net.*": ...}}``; safetensors exported from the Hugging Face wrapper
  carry ``model.net.*``. The prefix is normalised to the model's own names.
* Loading is strict: any missing, unexpected or shape-mismatched key raises
  :class:`CheckpointMismatchError` naming the keys (the official code used ``strict=False`` and
  silently left mismatched parameters random).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes differ from the model's state dict."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        source: str = "checkpoint",
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = [f"{source} does not match the model state dict strictly:"]
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_fmt(unexpected)}")
        if mismatched:
            shown = ", ".join(f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched[:_MAX_LISTED])
            more = f" ... (+{len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
            parts.append(f"shape mismatch for {len(mismatched)} key(s): {shown}{more}")
        super().__init__("\n  ".join(parts))


def _fmt(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a torch file (weights_only=True); unwrap known containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: Mapping[str, object] = load_file(str(path), device="cpu")
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickles with arbitrary objects are refused on purpose
            raise ValueError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(raw).__name__}")
    if "model_state_dict" in raw and isinstance(raw["model_state_dict"], Mapping):
        # Training-checkpoint layout of the official BaseModel: keep only "model." keys, strip it.
        inner = raw["model_state_dict"]
        raw = {k[len("model.") :]: v for k, v in inner.items() if k.startswith("model.")}
    elif "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor ({type(v).__name__})")
        out[str(k)] = v
    return out


def normalise_prefix(state: Mapping[str, torch.Tensor], expected_keys: list[str]) -> dict[str, torch.Tensor]:
    """Map checkpoint names onto the model's names when they differ only by a leading prefix.

    Handles ``model.net.x`` (HF safetensors) and bare ``x`` (backbone-only export) for a model whose
    names are ``net.x``. Anything else is left untouched so the strict check reports it.
    """
    expected = set(expected_keys)
    keys = list(state)
    if not keys or set(keys) & expected:
        return dict(state)
    model_prefix = "net." if all(k.startswith("net.") for k in expected_keys) else ""
    for strip in ("model.", "module.", "model.module."):
        if all(k.startswith(strip) for k in keys):
            cand = {k[len(strip) :]: v for k, v in state.items()}
            if set(cand) & expected:
                return cand
    if model_prefix:
        cand = {model_prefix + k: v for k, v in state.items()}
        if set(cand) & expected:
            return cand
    return dict(state)


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Raise CheckpointMismatchError unless names and shapes equal ``model.state_dict()`` exactly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)


def load_strict(model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor]) -> nn.Module:
    """Read (if a path), normalise the prefix, check strictly, then load. Returns the model."""
    if isinstance(path_or_state, (str, Path)):
        source = str(path_or_state)
        state = read_state_dict(path_or_state)
    else:
        source = "state dict"
        state = dict(path_or_state)
    state = normalise_prefix(state, list(model.state_dict()))
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model
