"""Download stage: URL manifest shards -> DOWNLOAD shards, img2dataset doing the fetching.

On the stage contract (pipeline/stage.py) the download is a `PlannedStage` whose units are the manifest
shards: manifest shard NNNNN becomes download shard NNNNN, one row per manifest row with `status`
"success" or a short code (errors.py). The stage only computes:

- `plan`: one `WorkUnit` per finished manifest shard (ids only);
- `run_unit` (on any worker): read the manifest shard, `fetch.download_shard` (pre-check, img2dataset's
  per-shard Downloader with our resizer, retries of transient failures beside the first pass), return
  the table and its counts.

The executor does everything else: claims the output, runs the units (Ray: one task per shard, as many in
flight as the cluster has CPUs, a time limit per task, resubmission of lost or timed-out tasks; local:
in-process), commits each shard from the worker that computed it (parquet, stats, marker last; on object
storage, PUTs), resumes by markers and writes the roll-up. A unit whose own error repeats on its last
attempt is committed with its rows as `task_failed` (counted; `webbody retry-downloads` re-fetches them),
so one bad shard does not fail the stage.

Counts: a shard's stats count the rows it holds (`rows_out` = manifest rows, failures included, as the
executor writes them) plus `images` (successes); the stage roll-up's `rows_out` is the images
(`rows_in - sum(drops)`), which is what the build funnel shows.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import BuildConfig, DownloadConfig, hashed_dump
from pipeline.download.errors import RETRYABLE
from pipeline.rollup import write_rollup
from pipeline.shards import ROLLUP, DatasetDir
from pipeline.stage import FinishResult, PlannedStage, StageError, UnitResult, WorkUnit, config_hash
from schemas.tables import DOWNLOAD, MANIFEST

if TYPE_CHECKING:  # annotations only
    from pipeline.stage import PlanContext, UnitContext

log = logging.getLogger(__name__)

STAGE = "download"
TASK_FAILED = "task_failed"
__all__ = ["RETRYABLE", "STAGE", "DownloadStage", "check_config", "download", "retry_failed_urls", "run"]


class DownloadStage(PlannedStage):
    """One unit per manifest shard (input `query`); `last_attempt` is the attempt index (0-based, own
    errors) after which a failing unit is committed as `task_failed` instead of raising."""

    name = STAGE
    output_schema = DOWNLOAD

    def __init__(self, config: DownloadConfig, last_attempt: int = 0):
        super().__init__(config)
        self.last_attempt = last_attempt

    def config_hash(self) -> str:
        # Settings marked execution() in pipeline/config.py (threads, task timeouts, ...) change how fast a
        # download runs, not what it produces: a resume with other values keeps its finished shards.
        return config_hash(hashed_dump(self.config))

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        manifest = ctx.inputs["query"]
        ids = manifest.done_ids()
        if not ids:
            raise StageError(f"no finished manifest shards in {manifest.uri}: run the query stage first "
                             "(webbody build ... --until query) or point --input at its output")
        return [WorkUnit(sid) for sid in ids]

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        from pipeline.download.fetch import download_shard, failed_shard

        manifest = ctx.inputs["query"]
        rows = MANIFEST.validate(manifest.read_shard(unit.id), str(manifest.parquet(unit.id)))
        try:
            table, stats = download_shard(rows, self.config, unit.id)
        except StageError:
            raise
        except Exception as exc:
            if ctx.attempt < self.last_attempt:
                raise  # the executor runs the unit again
            log.exception("download: shard %s failed on its last attempt; its rows are committed as %s",
                          unit.id, TASK_FAILED)
            table, stats = failed_shard(rows, unit.id, TASK_FAILED,
                                        f"attempt {ctx.attempt + 1}: {type(exc).__name__}: {exc}")
        extra = {"images": stats["rows_out"], "notes": stats["notes"],
                 "fetch_seconds": stats.get("fetch_seconds", 0.0)}
        return UnitResult(table, rows_in=stats["rows_in"], drops=Counter(stats["drops"]), extra_stats=extra)

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        return FinishResult(stats=_image_counts(ctx.output, rollup))


def _image_counts(out: DatasetDir, rollup: dict) -> dict:
    """Roll-up fields: `rows_out` = images (rows_in - drops) and the shards' notes summed."""
    notes: Counter = Counter()
    for sid in out.done_ids():
        notes.update(out.shard_stats(sid).get("notes", {}))
    return {"rows_out": rollup["rows_in"] - sum(rollup["drops"].values()), "notes": dict(sorted(notes.items()))}


def use_ray(cfg: DownloadConfig, executor: str) -> bool:
    if cfg.distributor == "ray":
        return True
    if cfg.distributor == "local":
        return False
    return executor == "ray"


def check_config(cfg: DownloadConfig) -> None:
    if cfg.encode_format == "png" and cfg.encode_quality > 9:
        raise StageError("download.encode_quality is the PNG compression level (0-9) when encode_format is png")
    if not cfg.disallowed_header_directives:
        log.warning(
            "download: opt-out headers are NOT honoured (download.disallowed_header_directives is empty); "
            "X-Robots-Tag noai/noindex images will be downloaded"
        )
    if cfg.allow_private_hosts:
        log.warning("download: private/loopback hosts allowed for %s", cfg.allow_private_hosts)


def download(cfg: BuildConfig, manifest_dir: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    """Download every pending manifest shard of `manifest_dir` into `output`; returns the roll-up stats."""
    from pipeline.executors import LocalExecutor, RayExecutor
    from pipeline.registry import ray_executor_options

    dcfg = cfg.download
    check_config(dcfg)
    t0 = time.perf_counter()
    if use_ray(dcfg, cfg.run.executor):
        ex = RayExecutor(**ray_executor_options(cfg, task_timeout_s=dcfg.task_timeout,
                                                task_retries=dcfg.task_attempts - 1))
        stage = DownloadStage(dcfg, last_attempt=dcfg.task_attempts - 1)
    else:
        ex, stage = LocalExecutor(), DownloadStage(dcfg)
    summary = ex.run(stage, {"query": str(manifest_dir)}, str(output), overwrite=overwrite)
    stats = summary.stats
    log.info("download: %d shards in %.1f s (%s executor, %d resubmitted, %d timed out)", len(summary.processed),
             time.perf_counter() - t0, ex.name, summary.resubmitted, summary.timed_out)
    return stats


def run(cfg: BuildConfig, inputs: dict, output: str | Path, overwrite: bool = False) -> dict:
    """Registry entry point: `inputs["query"]` is the manifest directory."""
    if "query" not in inputs:
        raise StageError("download needs the query stage's output (inputs['query'])")
    return download(cfg, inputs["query"], output, overwrite)


def retry_failed_urls(cfg: BuildConfig, output: str | Path, codes: frozenset[str] = RETRYABLE) -> dict:
    """A later retry pass over a finished download stage: re-fetch rows whose status is in `codes`.

    Not a stage run (the stage's shards are final): a maintenance pass like the bundle's `remove`, in
    this process, shard after shard (a finished build's failures are a small remainder). A shard whose
    rows changed is re-committed atomically through `DatasetDir.commit_shard` (parquet, stats, marker
    last) and the roll-up is rewritten. Returns {"retried": n, "recovered": m, "shards_rewritten": k}.
    """
    from pipeline.download.fetch import refetch

    dcfg = cfg.download
    out = DatasetDir(str(output))
    retried = recovered = rewritten = 0
    for sid in out.done_ids():
        status = out.read_shard(sid, columns=["status"]).column("status")
        if not pc.any(pc.is_in(status, pa.array(sorted(codes)))).as_py():
            continue
        table, n, changed = refetch(out.read_shard(sid), dcfg, codes)
        retried += n
        if not changed:
            continue
        st = out.shard_stats(sid)
        statuses = table.column("status").to_pylist()
        n_ok = sum(s == "success" for s in statuses)
        recovered += n_ok - st.get("images", 0)
        st.update(images=n_ok, drops=dict(sorted(Counter(s for s in statuses if s != "success").items())))
        st["notes"] = {**st.get("notes", {}), "retry_passes": st.get("notes", {}).get("retry_passes", 0) + 1}
        out.commit_shard(sid, table, st)
        rewritten += 1
    out = out.refresh()
    stats = write_rollup(out, STAGE, out.done_ids(), write=False)
    stats.update(_image_counts(out, stats))
    if stats["complete"]:
        out.write_json(ROLLUP, stats)
    return {"retried": retried, "recovered": recovered, "shards_rewritten": rewritten}
