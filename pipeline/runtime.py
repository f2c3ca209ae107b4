"""Process-wide settings that keep every run offline-safe and on loopback.

Ray probes cloud metadata addresses at start unless `$HOME/ray_bootstrap_config.yaml` names a local
provider; Prefect, Ultralytics and albumentations phone home unless told not to. Every entry point (CLI,
flows, tests, benchmarks) calls `ensure_offline_env()` before anything imports those libraries' runtime.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RAY_BOOTSTRAP = "provider: {type: local}\n"

_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # Prefect's temporary server (no server configured) needs 12-19 s to start on 2 idle cores, far more
    # on a loaded machine; its default 20 s start-up timeout then fails the whole run.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "1",
    "YOLO_VERBOSE": "false",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Data progress bars per operator are noisy in logs; the CLI has its own.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


_OFFLINE_SWITCHES = ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def cache_dir() -> Path:
    """Where weights and fetched assets live (`WEBBODY_CACHE`, default `<repo>/.cache` or ~/.cache/webbody)."""
    env = os.environ.get("WEBBODY_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / ".cache"
    return Path.home() / ".cache" / "webbody"


def ensure_offline_env() -> None:
    """Set the environment so no library reaches beyond loopback. Idempotent; never overrides a user's value."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Weight downloads (Ultralytics, Hugging Face) stay off unless the user opts in with WEBBODY_OFFLINE=0:
    # online users then get the official weights by name; the default never leaves the machine.
    if os.environ.setdefault("WEBBODY_OFFLINE", "1") != "0":
        for key in _OFFLINE_SWITCHES:
            os.environ.setdefault(key, "1")
    # Ray binds and addresses nodes by the machine's network IP (even for 127.0.0.1 cluster addresses) unless
    # its "no multi-machine cluster" switch is on; that keeps local Ray and one-machine test clusters on
    # loopback. A driver that joins a multi-machine cluster sets WEBBODY_RAY_LOOPBACK=0 (docker/compose.yaml).
    # Read at `import ray`, so this must run before the first import of ray.
    if os.environ.get("WEBBODY_RAY_LOOPBACK", "1") != "0":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    home = Path(os.environ.get("HOME", str(Path.home())))
    bootstrap = home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists() and os.environ.get("WEBBODY_NO_RAY_BOOTSTRAP") != "1":
        try:
            bootstrap.write_text(RAY_BOOTSTRAP)
        except OSError:
            pass  # read-only home: Ray still works, it only probes metadata endpoints
    _prepare_ultralytics_config()


def _prepare_ultralytics_config() -> None:
    # Ultralytics downloads Arial.ttf at first plot; give it matplotlib's DejaVuSans under that name.
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(cache_dir() / "ultralytics")))
    font_dir = cfg / "Ultralytics"
    target = font_dir / "Arial.ttf"
    if target.exists():
        return
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        font_dir.mkdir(parents=True, exist_ok=True)
        if src.exists():
            shutil.copyfile(src, target)
            shutil.copyfile(src, font_dir / "Arial.Unicode.ttf")
    except (ImportError, OSError):
        pass


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start (or connect to) Ray once, offline-safe. `address=None` starts a local in-process cluster."""
    ensure_offline_env()
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local" always starts a fresh in-process cluster: a bare ray.init() would silently join any other
        # Ray instance running on this machine (another user's, a test cluster) and die with it.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    # Keep Ray Data quiet. Order is not forced (`preserve_order` would let one slow block hold back all later
    # output): the executors never depend on it, each worker commits its own shard.
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
