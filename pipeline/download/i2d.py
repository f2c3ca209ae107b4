"""img2dataset's per-shard modules, imported without its package `__init__` (which would import torch).

`img2dataset/__init__.py` imports its whole job API (`main`): the writers, hence webdataset, hence torch
(webdataset's `pytorch` module), and the distributors. A download task needs only `img2dataset.downloader`
(the per-shard `Downloader`) and `img2dataset.resizer` (the `Resizer` interface ours keeps). Importing torch
costs every download worker seconds of CPU and a few hundred MB, and six workers starting at once paid it
together before the first shard could commit (benchmarks/results/download_cluster.json). So the package
entry is created without executing `__init__`; its submodules then import normally (they are unchanged,
from the installed img2dataset). Anything that later asks the package itself for its API
(`from img2dataset import download`) gets the real `__init__` run at that moment (PEP 562 `__getattr__`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def _bare_package() -> None:
    spec = importlib.util.find_spec("img2dataset")
    if spec is None or spec.loader is None:
        raise ImportError("img2dataset is not installed (pip install img2dataset)")
    pkg = importlib.util.module_from_spec(spec)
    done = False

    def __getattr__(name: str):  # noqa: N807 (PEP 562 module attribute hook)
        nonlocal done
        if name.startswith("__") or done:
            raise AttributeError(f"module 'img2dataset' has no attribute {name!r}")
        done = True
        spec.loader.exec_module(pkg)  # the package's own __init__, into the same module object
        return getattr(pkg, name)

    pkg.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["img2dataset"] = pkg


def module(name: str) -> ModuleType:
    """`img2dataset.<name>`, without running `img2dataset/__init__.py` when it has not run yet."""
    with _lock:
        if "img2dataset" not in sys.modules:
            _bare_package()
    return importlib.import_module(f"img2dataset.{name}")
