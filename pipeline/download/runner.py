"""Where download tasks run: one task per manifest shard, on a local process pool or on Ray at cluster width.

A task (`shard_task`) reads its manifest shard, runs `fetch.download_shard` and commits the DOWNLOAD shard
itself (atomic parquet, stats, marker last) straight to the output's location; it returns small stats
only, so the driver holds shard ids and counters, never rows or images.

- `run_ray`: as many tasks in flight as the cluster has CPUs (one CPU each; the window is re-read as nodes
  come and go), no barrier between shards, so the first shard commits as soon as its task ends. A task past
  `download.task_timeout` seconds is cancelled (its worker process killed); a failed, killed or timed-out
  task is resubmitted, up to `download.task_attempts` attempts in all. Ray's own task retries are off so
  every resubmission is counted here (`run.resubmitted`, `run.timed_out`).
- `run_local`: the same tasks on `download.processes_count` spawned processes (no Ray), resubmitted the
  same way when they fail or a process dies.

A shard whose task fails on every attempt is committed with all its rows under `task_failed` (the error in
`error`), so one bad task never fails the stage and every row stays counted; `webbody retry-downloads`
re-fetches those rows later (`task_failed` is retryable). A `StageError` raised in a task (the run itself
is wrong: bad manifest schema, missing library) stops the stage at once instead.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import DownloadConfig
from pipeline.download.child import RAY_RUNTIME_ENV, block_unused_modules
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from schemas.tables import MANIFEST

log = logging.getLogger(__name__)

TASK_FAILED = "task_failed"


@dataclass
class RunReport:
    """What one invocation did (the stage roll-up's volatile `run` block), plus per-task timing."""

    tasks: int = 0
    resubmitted: int = 0
    timed_out: int = 0
    failed_shards: list[str] = field(default_factory=list)
    width: int = 0
    first_commit_seconds: float | None = None
    fetch_seconds: float = 0.0
    intervals: list[tuple[float, float]] = field(default_factory=list)  # (start, end) wall times per task

    def summary(self, wall: float) -> dict:
        return {"tasks": self.tasks, "resubmitted": self.resubmitted, "timed_out": self.timed_out,
                "failed_shards": self.failed_shards, "width": self.width,
                "first_commit_seconds": self.first_commit_seconds, "wall_seconds": round(wall, 3),
                "fetch_seconds": round(self.fetch_seconds, 3),
                "in_flight": steady_in_flight(self.intervals, self.width)}


def shard_task(manifest_root: str, out_root: str, shard_id: str, cfg: DownloadConfig) -> dict:
    """Download one manifest shard and commit it; runs in a pool process or a Ray worker."""
    block_unused_modules()
    from pipeline.download.fetch import download_shard

    start = time.time()
    manifest, out = DatasetDir(manifest_root), DatasetDir(out_root)
    rows = MANIFEST.validate(manifest.read_shard(shard_id), str(manifest.parquet(shard_id)))
    table, stats = download_shard(rows, cfg, shard_id)
    out.commit_shard(shard_id, table, stats)
    return {"shard": shard_id, "start": start, "end": time.time(), "fetch_seconds": stats["fetch_seconds"],
            "host": socket.gethostname(), "pid": os.getpid()}


def commit_failed(manifest: DatasetDir, out: DatasetDir, shard_id: str, error: str) -> None:
    from pipeline.download.fetch import failed_shard

    rows = manifest.read_shard(shard_id, columns=["sample_id", "label", "name", "url"])
    table, stats = failed_shard(rows, shard_id, TASK_FAILED, error)
    out.commit_shard(shard_id, table, stats)


def _is_stage_error(exc: BaseException) -> bool:
    cause = getattr(exc, "cause", None)
    return isinstance(exc, StageError) or isinstance(cause, StageError)


class _Attempts:
    """Per-shard attempt counting shared by both runners."""

    def __init__(self, cfg: DownloadConfig, manifest: DatasetDir, out: DatasetDir, report: RunReport,
                 t0: float):
        self.cfg, self.manifest, self.out, self.report, self.t0 = cfg, manifest, out, report, t0
        self.tries: dict[str, int] = {}

    def started(self, sid: str) -> None:
        self.tries[sid] = self.tries.get(sid, 0) + 1
        self.report.tasks += 1
        if self.tries[sid] > 1:
            self.report.resubmitted += 1

    def succeeded(self, result: dict) -> None:
        if self.report.first_commit_seconds is None:
            self.report.first_commit_seconds = round(time.perf_counter() - self.t0, 3)
        self.report.fetch_seconds += result["fetch_seconds"]
        self.report.intervals.append((result["start"], result["end"]))

    def failed(self, sid: str, why: str) -> bool:
        """Returns True when the shard should be resubmitted; otherwise commits it as failed."""
        if self.tries.get(sid, 0) < self.cfg.task_attempts:
            log.warning("download: shard %s attempt %d failed (%s); resubmitting", sid, self.tries[sid], why)
            return True
        log.error("download: shard %s failed %d times (%s); its rows are committed as %s", sid,
                  self.tries[sid], why, TASK_FAILED)
        commit_failed(self.manifest, self.out, sid, f"{self.tries[sid]} attempts failed; last: {why}")
        self.report.failed_shards.append(sid)
        if self.report.first_commit_seconds is None:
            self.report.first_commit_seconds = round(time.perf_counter() - self.t0, 3)
        return False


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_ray(cfg: DownloadConfig, manifest: DatasetDir, out: DatasetDir, todo: list[str],
            address: str | None, t0: float) -> RunReport:
    import ray

    from pipeline.runtime import init_ray

    init_ray(address)
    report = RunReport()
    attempts = _Attempts(cfg, manifest, out, report, t0)
    remote = ray.remote(shard_task).options(
        num_cpus=1, max_retries=0, retry_exceptions=False, runtime_env=RAY_RUNTIME_ENV,
        name="download_shard",
    )
    queue: deque[str] = deque(todo)
    inflight: dict[Any, tuple[str, float]] = {}  # ref -> (shard id, submit time)
    root_m, root_o = str(manifest.root), str(out.root)
    last_width_check = 0.0
    width = 1
    while queue or inflight:
        now = time.perf_counter()
        if now - last_width_check > 5.0:
            width = cfg.max_in_flight or _cluster_cpus()
            report.width = max(report.width, width)
            last_width_check = now
        while queue and len(inflight) < width:
            sid = queue.popleft()
            attempts.started(sid)
            inflight[remote.remote(root_m, root_o, sid, cfg)] = (sid, time.perf_counter())
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            sid, _submitted = inflight.pop(ref)
            try:
                attempts.succeeded(ray.get(ref))
            except Exception as exc:  # noqa: BLE001  (a task error, a killed worker, a lost node)
                if _is_stage_error(exc):
                    for other in inflight:
                        ray.cancel(other, force=True)
                    raise StageError(f"download: shard {sid}: {getattr(exc, 'cause', exc)}") from exc
                if attempts.failed(sid, f"{type(exc).__name__}: {str(exc)[-300:]}"):
                    queue.appendleft(sid)
        now = time.perf_counter()
        for ref, (sid, submitted) in list(inflight.items()):
            if now - submitted > cfg.task_timeout:
                ray.cancel(ref, force=True)
                inflight.pop(ref)
                report.timed_out += 1
                if attempts.failed(sid, f"task_timeout: over {cfg.task_timeout} s"):
                    queue.appendleft(sid)
    return report


def run_local(cfg: DownloadConfig, manifest: DatasetDir, out: DatasetDir, todo: list[str],
              t0: float) -> RunReport:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.download.child import worker_init

    report = RunReport()
    attempts = _Attempts(cfg, manifest, out, report, t0)
    width = max(1, min(cfg.max_in_flight or cfg.processes_count, len(todo)))
    report.width = width
    queue: deque[str] = deque(todo)
    root_m, root_o = str(manifest.root), str(out.root)
    ctx = multiprocessing.get_context("spawn")
    while queue:
        broken = False
        with ProcessPoolExecutor(max_workers=width, mp_context=ctx, initializer=worker_init) as pool:
            inflight: dict[Any, str] = {}
            while (queue or inflight) and not broken:
                while queue and len(inflight) < width:
                    sid = queue.popleft()
                    attempts.started(sid)
                    inflight[pool.submit(shard_task, root_m, root_o, sid, cfg)] = sid
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    sid = inflight.pop(fut)
                    try:
                        attempts.succeeded(fut.result())
                    except BrokenProcessPool as exc:
                        broken = True  # a pool process died: every task in flight is lost with the pool
                        if attempts.failed(sid, f"worker process died: {exc}"):
                            queue.appendleft(sid)
                    except StageError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        if attempts.failed(sid, f"{type(exc).__name__}: {str(exc)[-300:]}"):
                            queue.appendleft(sid)
            if broken:
                for fut, sid in inflight.items():
                    fut.cancel()
                    if not out.is_done(sid) and attempts.failed(sid, "worker pool broke"):
                        queue.appendleft(sid)
    return report


def steady_in_flight(intervals: list[tuple[float, float]], width: int, step: float = 0.5) -> dict:
    """Running tasks sampled every `step` s from when the first `width` tasks were all running to the last
    task's start (after that the queue is empty and the tail drains): the part where in-flight == width is
    the claim. Counts come from the tasks' own start and end times (failed attempts are not included)."""
    if len(intervals) <= width or width < 1:
        return {"samples": 0}
    starts = sorted(s for s, _ in intervals)
    lo, hi = starts[width - 1], starts[-1]
    samples = [sum(1 for s, e in intervals if s <= t < e) for t in _ticks(lo, hi, step)]
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)
    return {"samples": len(samples), "median": ordered[len(ordered) // 2], "min": ordered[0],
            "max": ordered[-1], "at_width": round(sum(x >= width for x in samples) / len(samples), 3)}


def _ticks(lo: float, hi: float, step: float) -> list[float]:
    n = int((hi - lo) / step)
    return [lo + i * step for i in range(n + 1)]


def sampled_in_flight(intervals: list[tuple[float, float]], step: float = 0.5) -> list[int]:
    """Tasks running at evenly spaced instants between the first start and the last end."""
    if not intervals:
        return []
    lo, hi = min(s for s, _ in intervals), max(e for _, e in intervals)
    n = max(1, int((hi - lo) / step))
    return [sum(1 for s, e in intervals if s <= lo + i * step < e) for i in range(n)]
