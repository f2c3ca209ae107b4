"""img2dataset's per-shard modules, imported without its package `__init__` (which would import torch).

`img2dataset/__init__.py` imports its whole job API (`main`): the writers, hence webdataset, hence torch
(webdataset's `pytorch` module), and the distributors. A download task needs only `img2dataset.downloader`
(the per-shard `Downloader`) and `img2dataset.resizer` (the `Resizer` interface ours keeps). Importing torch
costs every download worker seconds of CPU and a few hundred MB, and six workers starting at once paid it
together before the first shard could commit (benchmarks/results/download_cluster.json). So the package
entry is created without executing `__init__`; its submodules then import normally (they are unchanged,
from the installed img2dataset). Anything that later asks the package itself for its API
(`from img2dataset import download`) gets the real `__init__` run at that moment (PEP 562 `__getattr__`).

The two per-shard modules also import, at their top, two libraries a download task never uses:
albumentations (`img2dataset.resizer`, for the resize that `worker.WebBodyResizer` replaces) and wandb
(`img2dataset.logger`, imported by the downloader for its counters; wandb serves only img2dataset's job
logger). Together they were ~1.3 s of a fresh worker's ~3 s of imports on an idle core, paid by every
download worker before its first shard (measured with `python -X importtime`; on this machine six
workers start at once on 2 cores). They are bound the same way as the package (`_deferred`): the name
is there for `import`, and the library really loads on its first use, should anything in the process
ever use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()

# Imported by img2dataset's per-shard modules, never used on a download task's path (see above).
UNUSED_IMPORTS = ("albumentations", "wandb")


# Attributes the import system and introspection look up on a module without using it.
_MACHINERY = frozenset({"__path__", "__file__", "__cached__", "__spec__", "__loader__", "__package__", "__name__",
                        "__builtins__", "__wrapped__", "__signature__", "__origin__", "__class_getitem__"})


def _deferred(name: str) -> ModuleType | None:
    """Bind `name` in sys.modules to its module object with its body not run yet; the body runs, into that
    same object, on the first access to an attribute it does not have (PEP 562 `__getattr__`). Look-ups
    of the import system's and introspection's own attributes (`_MACHINERY`) do not run it, so `import
    name` and imports of its submodules bind without loading it. The standard library's
    `importlib.util.LazyLoader` cannot serve here: its module loads on any attribute access, including
    the `__spec__` look-up of every later `import name` statement. None when `name` is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return None
    mod = importlib.util.module_from_spec(spec)
    done = False

    def __getattr__(attr: str):  # noqa: N807 (PEP 562 module attribute hook)
        nonlocal done
        if attr in _MACHINERY or done:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        done = True
        del mod.__getattr__
        spec.loader.exec_module(mod)  # the module's own body, into the same module object
        return getattr(mod, attr)

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[name] = mod
    return mod


def module(name: str) -> ModuleType:
    """`img2dataset.<name>`, without running `img2dataset/__init__.py` when it has not run yet."""
    with _lock:
        if "img2dataset" not in sys.modules and _deferred("img2dataset") is None:
            raise ImportError("img2dataset is not installed (pip install img2dataset)")
        for lib in UNUSED_IMPORTS:
            if lib not in sys.modules:
                _deferred(lib)  # not installed: img2dataset's own import of it then fails as before
    return importlib.import_module(f"img2dataset.{name}")
