"""Entry point of the img2dataset job process, and first module of every process img2dataset spawns from it.

`img2dataset.download(...)` runs in a child process rather than in the caller's process because it installs
a SIGINT handler (which only works from a main thread, and would hijack Ctrl-C of the whole flow) and
prints freely; the child is its own main thread and its output goes to a log file.

Start-up cost: `import img2dataset` pulls webdataset, which imports torch when it is installed (~5 s of CPU
per process, ~10 s on a loaded 2-core machine), and Ray (~1.5 s); the job process, img2dataset's logger
process and each download worker pay it. None of them uses torch (webdataset falls back cleanly when torch
is absent), nor Ray under the multiprocessing distributor. So in these processes only, the modules listed
in WEBBODY_I2D_BLOCK are marked absent before img2dataset is imported. The job process makes itself
`__main__`, so multiprocessing's spawn runs this module first in every grandchild, before unpickling work.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

JOB_ENV = "WEBBODY_I2D_JOB"
BLOCK_ENV = "WEBBODY_I2D_BLOCK"


def block_unused_modules() -> None:
    for mod in os.environ.get(BLOCK_ENV, "").split(","):
        if mod and mod not in sys.modules:
            sys.modules[mod] = None  # `import mod` now raises ModuleNotFoundError


if os.environ.get(JOB_ENV) == "1":
    block_unused_modules()


def child_main(params: dict, allow_private_hosts: list[str], log_path: str, ray_address: str | None,
               max_body_bytes: int | None = None) -> None:
    """Run one img2dataset job with our classes (worker.py); all output goes to `log_path`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    try:
        use_ray = params.get("distributor") == "ray"
        os.environ[JOB_ENV] = "1"
        os.environ[BLOCK_ENV] = "torch" if use_ray else "torch,ray"
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        os.environ.setdefault("WANDB_MODE", "disabled")
        block_unused_modules()
        sys.modules["__main__"] = sys.modules[__name__]
        from pipeline.download.worker import ALLOW_ENV, MAX_BODY_ENV, GuardedDownloader, WebBodyResizer

        os.environ[ALLOW_ENV] = json.dumps(list(allow_private_hosts))
        os.environ[MAX_BODY_ENV] = str(max_body_bytes or 0)
        # `img2dataset.main` the attribute is the CLI function; the module is reached through importlib
        i2d_main = importlib.import_module("img2dataset.main")
        for attr in ("Resizer", "Downloader", "download"):
            if not hasattr(i2d_main, attr):
                raise RuntimeError(f"img2dataset.main has no '{attr}': this img2dataset version is not supported")
        i2d_main.Resizer = WebBodyResizer
        i2d_main.Downloader = GuardedDownloader
        if use_ray:
            from pipeline.runtime import ensure_offline_env

            ensure_offline_env()
            import ray

            # Ray workers of this job skip the torch import as well (their first act, before any task)
            runtime_env = {
                "env_vars": {JOB_ENV: "1", BLOCK_ENV: "torch"},
                "worker_process_setup_hook": "pipeline.download.child.block_unused_modules",
            }
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False, runtime_env=runtime_env)
        i2d_main.download(**params)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
