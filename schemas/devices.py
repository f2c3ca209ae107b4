"""One device resolver for every model (persons, face embedders, SapiensID training and evaluation).

At the schemas level so that `pipeline` and `sapiensid` share it (sapiensid depends only on `schemas`).
torch is imported lazily: `webbody stats` and the schema validators must not load it.
"""

from __future__ import annotations


class DeviceError(ValueError):
    """A device name that is not understood, or a GPU asked for on a machine without one."""


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str, field: str = "device") -> str:
    """'auto' -> 'cuda:0' where a GPU is present, else 'cpu'; 'cpu'; 'cuda', 'cuda:N' or 'N' -> 'cuda:N'.

    A GPU that is absent (or an index past the last one) and any other name raise DeviceError naming `field`,
    so a config error says which setting to change instead of failing inside torch."""
    d = str(name).strip().lower()
    if d == "auto":
        return "cuda:0" if gpu_count() else "cpu"
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:") or d.isdigit():
        index = d.removeprefix("cuda").removeprefix(":") or "0"
        if not index.isdigit():
            raise DeviceError(f"{field} '{name}' not understood: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
        n = gpu_count()
        if n == 0:
            raise DeviceError(f"{field} is '{name}' but this machine has no CUDA GPU: use 'cpu' or 'auto'")
        if int(index) >= n:
            raise DeviceError(f"{field} is '{name}' but this machine has {n} GPU(s)")
        return f"cuda:{int(index)}"
    raise DeviceError(f"{field} '{name}' not understood: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
