"""Helpers for the model tests: official state-dict manifests and synthetic checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
SAPIENSID_MANIFEST = REFERENCE / "sapiensid_base_state_dict.json"
CVLFACE_MANIFEST = REFERENCE / "cvlface_vit_base_kprpe_state_dict.json"


def load_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def signature(state: dict[str, torch.Tensor]) -> str:
    """sha256 over "name:shape:dtype" lines, the manifests' signature_sha256 convention."""
    lines = "\n".join(f"{k}:{list(v.shape)}:{str(v.dtype).replace('torch.', '')}" for k, v in state.items())
    return hashlib.sha256(lines.encode()).hexdigest()


def synth_state(manifest: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the manifest's names, shapes and dtypes (stand-in for a release)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, meta in manifest["state_dict"].items():
        if meta["dtype"] == "int64":
            out[name] = torch.randint(0, 100, meta["shape"], generator=g)
        elif name.endswith("running_var"):
            out[name] = torch.rand(meta["shape"], generator=g) + 0.5
        else:
            out[name] = torch.randn(meta["shape"], generator=g) * 0.02
    return out
