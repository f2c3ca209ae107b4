"""The pipeline's stages, in order, and how each is run.

Each stage module exposes `run(cfg: BuildConfig, inputs: dict[str, str], output: str, overwrite: bool)
-> dict` (the stage's roll-up stats). `inputs` maps the names in `needs` to dataset directories, given as
locations: local paths or storage URIs (pipeline/storage.py) as strings; a stage turns them into
`DatasetDir`s, never into `pathlib.Path` (which mangles `s3://`). Modules are imported lazily so that
`webbody stats` does not load torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.config import BuildConfig
from pipeline.stage import StageError

E = TypeVar("E")


class Registry(dict[str, E], Generic[E]):
    """Named entries that users add to (face detectors, face embedders), filled by one decorator per kind the
    way timm registers models. Each entry names the `module` that registered it: the same module importing
    twice (a Ray worker, a reloaded plugin) is fine, another module taking the name is an error."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: E) -> E:
        old = self.get(name)
        if old is not None and getattr(old, "module", None) != getattr(entry, "module", None):
            raise StageError(f"{self.kind} '{name}' is already registered by {getattr(old, 'module', '?')}")
        self[name] = entry
        return entry

    def entry(self, name: str) -> E:
        if name not in self:
            raise StageError(f"unknown {self.kind} '{name}': choose one of {', '.join(sorted(self))} (one of "
                             "your own registers itself from a module in the config's `plugins`)")
        return self[name]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # imported when the stage runs; it exposes run(cfg, inputs, output, overwrite) -> stats
    needs: tuple[str, ...]  # earlier stages whose outputs this stage reads
    description: str
    # The stage's own config section: a pydantic model validating `cfg.extensions[name]` (user stages; the
    # built-in stages have their sections on BuildConfig itself). None = the stage takes no settings.
    section: type[BaseModel] | None = None


_STAGES: dict[str, StageSpec] = {}  # in run order


def register_stage(name: str, module: str, needs: tuple[str, ...] = (), description: str = "",
                   after: str | None = None, section: type[BaseModel] | None = None,
                   replace: bool = False) -> StageSpec:
    """Add a stage to the pipeline, the way timm registers a model: the last stage by default, or right after
    `after`. Every stage it `needs` must be registered before it. A user stage lives in its own module, named
    in the config's `plugins` list, which calls this at import (tests/toy_stage.py is one)."""
    if name in _STAGES and not replace:
        if _STAGES[name].module == module:
            return _STAGES[name]  # the same module imported twice (e.g. by a Ray worker): nothing to do
        raise StageError(f"stage '{name}' is already registered by {_STAGES[name].module}")
    unknown = [n for n in needs if n not in _STAGES or n == name]
    if unknown:
        raise StageError(f"stage '{name}' needs {unknown}, which are not registered stages before it")
    if after is not None and after not in _STAGES:
        raise StageError(f"stage '{name}': after='{after}' is not a registered stage")
    spec = StageSpec(name, module, tuple(needs), description, section)
    items = [(k, v) for k, v in _STAGES.items() if k != name]
    at = len(items) if after is None else [k for k, _ in items].index(after) + 1
    items.insert(at, (name, spec))
    _STAGES.clear()
    _STAGES.update(items)
    return spec


register_stage("query", "pipeline.query", (), "name queries -> URL manifest")
register_stage("download", "pipeline.download", ("query",), "URL manifest -> images (img2dataset)")
register_stage("persons", "pipeline.persons", ("download",), "images -> body crops + 17 keypoints (YOLO pose)")
register_stage("faces", "pipeline.faces", ("persons",), "body crops -> face box, landmarks, feature")
register_stage("clean", "pipeline.clean", ("faces", "persons"), "features -> clean identity selection")
register_stage("bundle", "pipeline.bundle", ("clean", "persons", "faces"), "selection -> WebDataset shards")

def unregister_stage(name: str) -> None:
    """Remove a user stage (tests, notebooks); the built-in stages stay."""
    if name in BUILTIN_STAGES:
        raise StageError(f"stage '{name}' is built in and cannot be removed")
    _STAGES.pop(name, None)


BUILTIN_STAGES = ("query", "download", "persons", "faces", "clean", "bundle")


def stage_names() -> list[str]:
    return list(_STAGES)


def get_stage(name: str) -> StageSpec:
    try:
        return _STAGES[name]
    except KeyError:
        raise StageError(f"unknown stage '{name}': choose one of {', '.join(_STAGES)} "
                         "(a user stage's module must be in the config's `plugins`)") from None


def load_plugins(cfg: BuildConfig) -> None:
    """Import the config's `plugins` modules (each registers its stages), then check every `extensions`
    section against its stage's section model: an unknown section or a bad value is a clear error."""
    for mod in cfg.plugins:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise StageError(f"plugin module '{mod}' (config `plugins`) could not be imported: {exc}") from exc
    for name in cfg.extensions:
        spec = _STAGES.get(name)
        if spec is None or spec.section is None:
            raise StageError(f"config section extensions.{name}: no registered stage '{name}' takes settings")
        section_config(cfg, name)


def section_config(cfg: BuildConfig, name: str) -> BaseModel | None:
    """A user stage's validated settings (`extensions.<name>`, defaults where absent)."""
    spec = get_stage(name)
    if spec.section is None:
        return None
    try:
        return spec.section.model_validate(cfg.extensions.get(name, {}))
    except ValidationError as exc:
        lines = [f"  extensions.{name}.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise StageError("invalid config:\n" + "\n".join(lines)) from None


def run_stage(name: str, cfg: BuildConfig, inputs: Mapping[str, str | os.PathLike], output: str | os.PathLike,
              overwrite: bool = False) -> dict[str, Any]:
    load_plugins(cfg)
    spec = get_stage(name)
    missing = [n for n in spec.needs if n not in inputs]
    if missing:
        raise StageError(f"stage '{name}' needs the output of {missing}")
    module = importlib.import_module(spec.module)
    locs = {k: _location(v) for k, v in inputs.items()}
    return module.run(cfg, locs, _location(output), overwrite=overwrite)


def _location(loc: str | os.PathLike) -> str:
    from pipeline import storage

    s = os.fspath(loc)
    storage.scheme_of(s)  # a mangled or unknown scheme fails here, with what to do
    return s


def stages_until(until: str | None, cfg: BuildConfig | None = None) -> list[StageSpec]:
    """The stages to run, in order, up to and including `until` (all when None); `cfg`'s plugins first."""
    if cfg is not None:
        load_plugins(cfg)
    names = stage_names()
    if until is not None:
        names = names[: names.index(get_stage(until).name) + 1]
    return [_STAGES[n] for n in names]


def executor_from_config(cfg: BuildConfig):
    from pipeline.executors import make_executor

    if cfg.run.executor == "local":
        return make_executor("local")
    return make_executor("ray", **ray_executor_options(cfg))


def ray_executor_options(cfg: BuildConfig, **section: Any) -> dict[str, Any]:
    """RayExecutor keyword arguments from the run section; a stage section's non-None values override."""
    r = cfg.run
    opts: dict[str, Any] = {
        "num_actors": r.num_actors, "min_actors": r.min_actors, "max_actors": r.max_actors,
        "actor_cpus": r.actor_cpus, "actor_gpus": r.actor_gpus, "address": r.ray_address,
        "task_cpus": r.task_cpus, "task_timeout_s": r.task_timeout_s, "task_retries": r.task_retries,
    }
    opts.update({k: v for k, v in section.items() if v is not None})
    return opts
