"""The `webbody-build` flow: stages in order, each a Prefect task that passes paths, computing on Ray.

Prefect owns orchestration (flow/task runs, logs, artifacts, deployments); the stages themselves run on
Ray through `pipeline.executors` (local Ray by default, `ray_address` for a cluster). Every stage is
resumable from its completion markers, so re-running the flow after a crash redoes only unfinished shards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.runtime import ensure_offline_env

ensure_offline_env()

from prefect import flow, get_run_logger, task  # noqa: E402

from pipeline import storage  # noqa: E402
from pipeline.config import BuildConfig, load_config  # noqa: E402
from pipeline.registry import get_stage, run_stage, stages_until  # noqa: E402
from pipeline.rollup import write_funnel  # noqa: E402

log = logging.getLogger("webbody.build")


def build_root(output: str | os.PathLike) -> str:
    """The build's location: an absolute local path, or the URI as given (checked: unknown schemes fail)."""
    s = os.fspath(output)
    if storage.is_local(s):
        return str(storage.local_path(s).resolve())
    storage.resolve(s)  # unknown scheme, missing package, credentials in the URI: a clear error now
    return s.rstrip("/")


def stage_dirs(output: str | os.PathLike, names: list[str]) -> dict[str, str]:
    return {n: storage.join(output, n) for n in names}


def load_build_config(config_path: str | None, ray_address: str | None, overrides: dict | None = None) -> BuildConfig:
    over = dict(overrides or {})
    if ray_address:
        over["run.ray_address"] = ray_address
        over["run.executor"] = "ray"
    return load_config(config_path, over)


def run_one_stage(name: str, cfg: BuildConfig, output: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Run one stage of a build directory: inputs are the build's earlier stage directories."""
    spec = get_stage(name)
    inputs = {n: storage.join(output, n) for n in spec.needs}
    return run_stage(name, cfg, inputs, storage.join(output, name), overwrite=overwrite)


@task(name="stage", task_run_name="{name}", retries=0)
def stage_task(name: str, config_path: str | None, output: str, ray_address: str | None = None,
               overrides: dict | None = None, overwrite: bool = False) -> dict:
    cfg = load_build_config(config_path, ray_address, overrides)
    stats = run_one_stage(name, cfg, output, overwrite=overwrite)
    get_run_logger().info("%s: %s", name, _short(stats))
    return {"stage": name, "dir": storage.join(output, name), "stats": stats}


def _short(stats: dict) -> str:
    return json.dumps({k: stats.get(k) for k in ("rows_in", "rows_out", "drops") if k in stats})


def finish_build(output: str, names: list[str]) -> dict:
    """Write the run-level funnel (`stats.json`) and, after the bundle, verify it and write the report."""
    funnel = write_funnel(output, stage_dirs(output, names))
    result: dict[str, Any] = {"output": output, "stats": storage.join(output, "stats.json"), "funnel": funnel}
    if "bundle" in names and storage.list_dir(storage.join(output, "bundle")):
        result.update(_verify_and_report(output))
    return result


def _verify_and_report(output: str) -> dict:
    from pipeline.bundle.report import write_report
    from pipeline.bundle.verify import verify_bundle

    bundle = storage.join(output, "bundle")
    local = storage.is_local(output)
    problems = verify_bundle(Path(bundle) if local else bundle)
    if problems:
        raise RuntimeError("bundle verification failed:\n" + "\n".join(map(str, problems[:20])))
    report = write_report(Path(bundle) if local else bundle, build_root=Path(output) if local else output)
    return {"verified": True, "report": str(report)}


@flow(name="webbody-build", log_prints=True)
def build_flow(config_path: str | None = None, output: str = "output/webbody", until: str | None = None,
               ray_address: str | None = None, overwrite: bool = False,
               overrides: dict | None = None) -> dict:
    """Build WebBody from name queries to verified WebDataset shards (or up to `until`)."""
    out = build_root(output)
    storage.makedirs(out)
    cfg = load_build_config(config_path, ray_address, overrides)  # fail fast on a bad config, before any stage
    names = [s.name for s in stages_until(until, cfg)]
    for name in names:
        stage_task(name, config_path, out, ray_address, overrides, overwrite)
    result = finish_build(out, names)
    _publish_artifacts(result)
    return result


def build_plain(config_path: str | None = None, output: str = "output/webbody", until: str | None = None,
                ray_address: str | None = None, overwrite: bool = False, overrides: dict | None = None) -> dict:
    """The same stage sequence without Prefect (for `webbody build --no-prefect`, debugging and fault tests)."""
    out = build_root(output)
    storage.makedirs(out)
    cfg = load_build_config(config_path, ray_address, overrides)
    names = [s.name for s in stages_until(until, cfg)]
    for name in names:
        stats = run_one_stage(name, cfg, out, overwrite=overwrite)
        log.info("%s: %s", name, _short(stats))
    return finish_build(out, names)


def _publish_artifacts(result: dict) -> None:
    try:
        from prefect.artifacts import create_link_artifact, create_table_artifact
    except ImportError:
        return
    rows = [
        {"stage": s["stage"], "rows_in": s.get("rows_in"), "rows_out": s.get("rows_out"),
         "drops": ", ".join(f"{k}: {v}" for k, v in (s.get("drops") or {}).items())}
        for s in result["funnel"]["stages"]
    ]
    create_table_artifact(key="webbody-funnel", table=rows, description="WebBody build funnel")
    if result.get("report"):
        report = str(result["report"])
        create_link_artifact(key="webbody-report", link=Path(report).as_uri() if storage.is_local(report) else report,
                             description="WebBody build report (static HTML)")
