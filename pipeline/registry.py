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
from typing import Any

from pipeline.config import BuildConfig
from pipeline.stage import StageError


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    needs: tuple[str, ...]  # earlier stages whose outputs this stage reads
    description: str


STAGES: list[StageSpec] = [
    StageSpec("query", "pipeline.query", (), "name queries -> URL manifest"),
    StageSpec("download", "pipeline.download", ("query",), "URL manifest -> images (img2dataset)"),
    StageSpec("persons", "pipeline.persons", ("download",), "images -> body crops + 17 keypoints (YOLO pose)"),
    StageSpec("faces", "pipeline.faces", ("persons",), "body crops -> face box, landmarks, feature"),
    StageSpec("clean", "pipeline.clean", ("faces",), "features -> clean identity selection"),
    StageSpec("bundle", "pipeline.bundle", ("clean", "persons", "faces"), "selection -> WebDataset shards"),
]
STAGE_NAMES = [s.name for s in STAGES]


def get_stage(name: str) -> StageSpec:
    for s in STAGES:
        if s.name == name:
            return s
    raise StageError(f"unknown stage '{name}': choose one of {', '.join(STAGE_NAMES)}")


def available(name: str) -> bool:
    """Whether the stage's module exists in this checkout (stages land one by one)."""
    return importlib.util.find_spec(get_stage(name).module) is not None


def run_stage(name: str, cfg: BuildConfig, inputs: Mapping[str, str | os.PathLike], output: str | os.PathLike,
              overwrite: bool = False) -> dict[str, Any]:
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


def stages_until(until: str | None) -> list[StageSpec]:
    if until is None:
        return [s for s in STAGES if available(s.name)]
    names = STAGE_NAMES[: STAGE_NAMES.index(get_stage(until).name) + 1]
    return [get_stage(n) for n in names]


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
