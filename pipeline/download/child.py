"""Set-up of the processes that run download tasks (local pool processes and the stage's Ray workers).

Start-up cost: `import img2dataset` pulls webdataset, which imports torch when it is installed (~5 s of CPU
per process, ~10-20 s on a loaded 2-core machine). Nothing in a download worker uses torch (webdataset falls
back cleanly when it is absent), so these processes mark the modules listed in WEBBODY_I2D_BLOCK absent
before img2dataset is imported. Only processes dedicated to download tasks do this: local pool processes
(spawned for the stage, `worker_init`) and Ray workers started with the stage's runtime environment
(`RAY_RUNTIME_ENV`, which gives them their own worker pool, never shared with tasks of other stages).
"""

from __future__ import annotations

import os
import sys

JOB_ENV = "WEBBODY_I2D_JOB"
BLOCK_ENV = "WEBBODY_I2D_BLOCK"

# Ray workers for download tasks: torch blocked (Ray itself is of course needed there).
RAY_RUNTIME_ENV = {"env_vars": {JOB_ENV: "1", BLOCK_ENV: "torch", "NO_ALBUMENTATIONS_UPDATE": "1",
                                "WANDB_MODE": "disabled"}}


def block_unused_modules() -> None:
    """In a dedicated download process only (JOB_ENV set), make `import torch` (etc.) fail fast."""
    if os.environ.get(JOB_ENV) != "1":
        return
    for mod in os.environ.get(BLOCK_ENV, "").split(","):
        if mod and mod not in sys.modules:
            sys.modules[mod] = None  # `import mod` now raises ModuleNotFoundError


def worker_init(block: str = "torch,ray") -> None:
    """Initializer of the local pool's processes."""
    os.environ[JOB_ENV] = "1"
    os.environ[BLOCK_ENV] = block
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    block_unused_modules()
