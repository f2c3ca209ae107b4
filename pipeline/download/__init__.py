"""Download stage: URL manifest shards -> DOWNLOAD shards, img2dataset doing the fetching.

The manifest shard is the unit of work: manifest shard NNNNN becomes download shard NNNNN, one row per
manifest row with `status` "success" or a short code (errors.py). The pieces:

- `fetch.download_shard(rows, cfg, shard_id) -> (table, stats)`: the pure per-shard function (pre-check,
  img2dataset's per-shard Downloader with our resizer, retry pass, one row per manifest row);
- `runner`: where those run (Ray tasks at cluster width, or a local process pool), each task committing
  its own shard; time limit, resubmission and failure counting per task;
- this module: the stage entry point (config checks, output claim, resume by markers, roll-up) and the
  later retry pass `retry_failed_urls`.

Resume: committed shards are skipped by their markers; a killed run loses only the shards in flight, which
the next run downloads again (a task keeps no state outside its commit).
"""

from __future__ import annotations

from pipeline.download.child import block_unused_modules

block_unused_modules()  # first: in a dedicated download worker, before anything can import torch

import logging  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline.config import BuildConfig, DownloadConfig  # noqa: E402
from pipeline.download.errors import RETRYABLE  # noqa: E402
from pipeline.executors import pending_shards, prepare_output  # noqa: E402
from pipeline.rollup import write_rollup  # noqa: E402
from pipeline.shards import DatasetDir, atomic_write_json  # noqa: E402
from pipeline.stage import StageError, config_hash  # noqa: E402
from schemas.tables import DOWNLOAD  # noqa: E402

log = logging.getLogger(__name__)

STAGE = "download"
# Settings that change how fast a download runs, not what it produces: they may change between a run and
# its resume without invalidating finished shards.
RUNTIME_ONLY = ("processes_count", "thread_count", "distributor", "retry_failed", "task_timeout",
                "task_attempts", "max_in_flight")

__all__ = ["RETRYABLE", "STAGE", "check_config", "download", "retry_failed_urls", "run"]


class _StageInfo:
    """What `prepare_output` needs from a stage: a name and a hash of the settings that shape the output."""

    name = STAGE

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg

    def config_hash(self) -> str:
        return config_hash({k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in RUNTIME_ONLY})


def use_ray(cfg: DownloadConfig, executor: str, ray_address: str | None) -> bool:
    if cfg.distributor == "ray":
        return True
    if cfg.distributor == "multiprocessing":
        return False
    return executor == "ray" or bool(ray_address)


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


def download(cfg: DownloadConfig, manifest_dir: Path, output: Path, overwrite: bool = False,
             ray_address: str | None = None, executor: str = "local") -> dict:
    """Download every pending manifest shard of `manifest_dir` into `output`; returns the roll-up stats."""
    from pipeline.download.runner import run_local, run_ray

    check_config(cfg)
    t0 = time.perf_counter()
    manifest, out = DatasetDir(manifest_dir), DatasetDir(output)
    prepare_output(_StageInfo(cfg), out, overwrite)
    todo, _done = pending_shards(manifest, out)
    for sid in [s for s in todo if manifest.num_rows(s) == 0]:
        out.commit_shard(sid, DOWNLOAD.empty(), {"stage": STAGE, "shard": sid, "rows_in": 0, "rows_out": 0,
                                                 "drops": {}, "seconds": 0.0, "notes": {}})
    todo = [s for s in todo if not out.is_done(s)]
    ray_mode = use_ray(cfg, executor, ray_address)
    if not todo:
        from pipeline.download.runner import RunReport

        report = RunReport()
    elif ray_mode:
        report = run_ray(cfg, manifest, out, todo, ray_address, t0)
    else:
        report = run_local(cfg, manifest, out, todo, t0)
    wall = time.perf_counter() - t0
    stats = write_rollup(out, STAGE, manifest.done_ids())
    notes: Counter = Counter()
    for sid in manifest.done_ids():
        if out.is_done(sid):
            notes.update(out.shard_stats(sid).get("notes", {}))
    stats["notes"] = dict(sorted(notes.items()))
    # This invocation's facts (a resumed run reports only its own work): tasks, resubmissions, timing.
    stats["run"] = {**report.summary(wall), "runner": "ray" if ray_mode else "local"}
    log.info("download: %d shards in %.1f s (%s, %d in flight, %d resubmitted, %d failed)", len(todo), wall,
             stats["run"]["runner"], report.width, report.resubmitted, len(report.failed_shards))
    if stats["complete"]:
        atomic_write_json(out.root / "stats.json", stats)
    return stats


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Registry entry point: `inputs["query"]` is the manifest directory."""
    if "query" not in inputs:
        raise StageError("download needs the query stage's output (inputs['query'])")
    return download(cfg.download, Path(inputs["query"]), Path(output), overwrite, cfg.run.ray_address,
                    cfg.run.executor)


def retry_failed_urls(cfg: BuildConfig, output: Path, codes: frozenset[str] = RETRYABLE) -> dict:
    """A later retry pass: re-fetch rows of finished download shards whose status is in `codes`.

    Successes replace the failures; shards whose rows changed are re-committed (atomically, new stats).
    Runs in this process, shard after shard (the failures of a finished build are a small remainder).
    Returns {"retried": n, "recovered": m, "shards_rewritten": k}.
    """
    from pipeline.download.fetch import refetch

    dcfg = cfg.download
    out = DatasetDir(output)
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
        recovered += n_ok - st["rows_out"]
        st.update(rows_out=n_ok, drops=dict(sorted(Counter(s for s in statuses if s != "success").items())))
        st["notes"] = {**st.get("notes", {}), "retry_passes": st.get("notes", {}).get("retry_passes", 0) + 1}
        out.commit_shard(sid, table, st)
        rewritten += 1
    write_rollup(out, STAGE, out.done_ids())
    return {"retried": retried, "recovered": recovered, "shards_rewritten": rewritten}
