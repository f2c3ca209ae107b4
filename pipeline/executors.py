"""Executors: run a stage's work units, and own everything the contract promises (pipeline/stage.py).

An executor claims the output (`_stage.json`), finds finished shards with one listing, runs the pending
units, commits each shard atomically with its stats and marker (pipeline/shards.py), resumes, and writes
the roll-up. A unit is an input shard of a `ShardStage` or a `WorkUnit` of a `PlannedStage`; either way
the same function (`execute_unit`) runs it, in-process or on a Ray worker, so every executor writes the
same bytes.

- `LocalExecutor`: in-process, unit after unit (tests, debugging, tiny inputs).
- `RayExecutor`: workers own their shards. The driver holds unit ids and small stats only; each worker
  reads its unit's input from storage, computes, and commits the output shard itself.
  * CPU stages: one Ray task per unit, as many in flight as the cluster has CPUs for them (re-read as nodes
    come and go), no job-wide barrier (a shard commits the moment its task ends), a per-task time limit
    (`task_timeout_s`: the task is cancelled and run again) and resubmission of failed or lost tasks
    (counted in the roll-up's `run` block).
  * Model stages: a pool of actors (one `setup()`, one model load, per actor), sized from the cluster's
    GPUs (fractional: `actor_gpus: 0.25` = 4 actors a GPU) or CPUs, within `min_actors`/`max_actors` and
    never above the number of pending shards; one shard in flight per actor. An actor lost with its node
    is replaced (Ray places it on a live node) and its shard runs again elsewhere, with the same bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.progress import progress
from pipeline.rollup import write_rollup
from pipeline.shards import ROLLUP, SHARD_RE, STAGE_META, DatasetDir, OutputClaimError, claim_output
from pipeline.stage import (
    BatchResult,
    PlanContext,
    PlannedStage,
    ShardStage,
    Stage,
    StageError,
    UnitContext,
    WorkUnit,
    add_batch_stats,
    new_shard_stats,
)

log = logging.getLogger(__name__)

InputsArg = str | os.PathLike | DatasetDir | Mapping[str, Any] | None


@dataclass
class RunSummary:
    stage: str
    output: str
    processed: list[str]
    skipped: list[str]
    stats: dict
    resubmitted: int = 0
    timed_out: int = 0
    failed: list[str] = field(default_factory=list)


# -- output claim and pending work -----------------------------------------------------------------------------


def prepare_output(stage: Stage, out: DatasetDir, overwrite: bool = False, meta: dict | None = None,
                   discard_shards: bool = False) -> bool:
    """Claim the output for this stage and config; an earlier run with another config is discarded with
    `overwrite` (markers and roll-up removed; with `discard_shards` every shard object too) and refused
    without. Returns True when an earlier run was discarded."""
    storage.makedirs(out.uri)
    out.clean_temporaries()
    meta = meta or {"stage": stage.name, "config_hash": stage.config_hash()}
    try:
        changed = claim_output(out, meta, overwrite)
    except OutputClaimError as exc:
        raise StageError(f"{exc} (config differs)") from None
    if changed:
        names = out.listing(refresh=True)
        drop = [n for n in names if n.endswith(".done") or n == ROLLUP]
        if discard_shards:
            owns = getattr(stage, "owns", None)
            drop += [n for n in names if (n.startswith("part-") or (owns is not None and owns(n))) and n not in drop]
        out.delete(drop)
    return changed


def pending_shards(inp: DatasetDir, out: DatasetDir) -> tuple[list[str], list[str]]:
    ids = inp.done_ids()
    if not ids:
        raise StageError(
            f"no finished input shards in {inp.uri}: run the previous stage first "
            "(webbody build ... --until STAGE) or point --input at its output"
        )
    done = [s for s in ids if out.is_done(s)]
    todo = [s for s in ids if not out.is_done(s)]
    return todo, done


# -- the one function that runs a unit (driver or worker) ---------------------------------------------------------


def safe_process(stage: ShardStage, batch: pa.Table) -> BatchResult:
    """`stage.process`, except that an unexpected exception drops the batch under a counted reason.

    Stages handle bad rows themselves (decode errors, no face...); this is the last guard so one bad batch
    never kills a shard of thousands. StageError (the run itself is wrong) still propagates.
    """
    try:
        return stage.process(batch)
    except StageError:
        raise
    except Exception as exc:  # noqa: BLE001
        log.exception("stage %s: batch of %d rows failed", stage.name, batch.num_rows)
        return BatchResult(stage.output_schema.empty(), Counter({f"error_{type(exc).__name__}": batch.num_rows}))


def _process_table(stage: ShardStage, table: pa.Table, stats: dict) -> list[pa.Table]:
    parts: list[pa.Table] = []
    bs = max(1, stage.batch_size)
    for start in range(0, table.num_rows, bs):
        batch = table.slice(start, bs)
        result = safe_process(stage, batch)
        add_batch_stats(stats, batch.num_rows, result)
        if result.table.num_rows:
            parts.append(result.table)
    return parts


def _concat(stage: Stage, parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return stage.output_schema.empty()
    parts = [stage.output_schema.validate(p, where=f"{stage.name} output") for p in parts]
    return pa.concat_tables(parts)


def run_shard(stage: ShardStage, inp: DatasetDir, out: DatasetDir, shard_id: str,
              had_marker: bool | None = None) -> dict:
    """Process one input shard and commit the output shard with the same id; returns its stats."""
    stage.ensure_setup()
    t0 = time.perf_counter()
    table = inp.read_shard(shard_id, verify=True)
    if stage.input_schema is not None:
        table = stage.input_schema.validate(table, where=str(inp.parquet(shard_id)))
    stats = new_shard_stats(stage.name, shard_id)
    parts = _process_table(stage, table, stats)
    del table
    result = stage.finalize_shard(_concat(stage, parts))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    out.commit_shard(shard_id, result, stats, had_marker=had_marker)
    return stats


def run_planned_unit(stage: PlannedStage, unit: WorkUnit, inputs: dict[str, DatasetDir], out: DatasetDir,
                     attempt: int = 0, had_marker: bool | None = None) -> dict:
    """Run one work unit and commit its shard (extra objects, parquet, stats, marker); returns its stats."""
    stage.ensure_setup()
    t0 = time.perf_counter()
    work_uri = storage.join(out.uri, "_work", unit.id)
    tmp = Path(tempfile.mkdtemp(prefix=f"webbody-{stage.name}-{unit.id}-"))
    try:
        ctx = UnitContext(inputs=inputs, output=out, local_tmp=tmp, work_uri=work_uri, attempt=attempt)
        res = stage.run_unit(unit, ctx)
        table = stage.finalize_shard(res.table)
        stats = new_shard_stats(stage.name, unit.id)
        stats["rows_in"] = int(res.rows_in)
        stats["rows_out"] = table.num_rows
        stats["drops"] = dict(sorted((k, int(v)) for k, v in res.drops.items() if v))
        stats.update({k: v for k, v in res.extra_stats.items() if k not in stats})
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        out.commit_shard(unit.id, table, stats, files=res.files, had_marker=had_marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stage.uses_work_prefix:
        _remove_work(work_uri)  # a request or two on object stores: only for stages that write there
    return stats


def _remove_work(work_uri: str) -> None:
    fs, path = storage.resolve(work_uri)
    try:
        if fs is None:
            shutil.rmtree(path, ignore_errors=True)
        elif fs.exists(path):
            fs.rm(path, recursive=True)
    except (FileNotFoundError, OSError):
        pass


@dataclass(frozen=True)
class _Job:
    """What a worker gets: the stage's unit and where to read and write (locations only, no rows)."""

    unit_id: str
    unit: WorkUnit | None  # None for a ShardStage (the unit is the input shard `unit_id`)
    inputs: dict[str, DatasetDir]
    out: DatasetDir
    had_marker: bool = False  # the driver's listing showed a (stale) marker: the commit removes it first


def execute_unit(stage: Stage, job: _Job, attempt: int = 0) -> dict:
    if isinstance(stage, PlannedStage):
        assert job.unit is not None
        return run_planned_unit(stage, job.unit, job.inputs, job.out, attempt, job.had_marker)
    assert isinstance(stage, ShardStage)
    return run_shard(stage, job.inputs["input"], job.out, job.unit_id, job.had_marker)


# -- planning: the same for every executor ------------------------------------------------------------------------


@dataclass
class _Plan:
    stage: Stage
    inputs: dict[str, DatasetDir]
    out: DatasetDir
    jobs: list[_Job]  # pending, in unit order
    done: list[str]
    expected: list[str]
    ctx: PlanContext | None = None
    finished: dict | None = None  # the roll-up of an already finished planned stage (nothing to do)


def _as_inputs(inputs: InputsArg) -> dict[str, DatasetDir]:
    if inputs is None:
        return {}
    if isinstance(inputs, Mapping):
        return {k: DatasetDir(v) for k, v in inputs.items()}
    return {"input": DatasetDir(inputs)}


def plan_run(stage: Stage, inputs: InputsArg, output: Any, overwrite: bool = False) -> _Plan:
    """Claim the output and list what is pending: one listing of the input and one of the output."""
    ins = _as_inputs(inputs)
    out = DatasetDir(output)
    if isinstance(stage, PlannedStage):
        ctx = PlanContext(inputs=ins, output=out)
        meta = {"stage": stage.name, "config_hash": stage.config_hash()}
        ih = stage.input_hash(ctx)
        if ih is not None:
            meta["input_hash"] = ih
        changed = prepare_output(stage, out, overwrite, meta=meta, discard_shards=True)
        if not changed and out.has(ROLLUP):
            # Same config and inputs, finished: nothing to plan (planning may mean reading every input).
            finished = out.read_json(ROLLUP)
            if finished.get("complete") and finished.get("shards") == len(out.done_ids()):
                return _Plan(stage, ins, out, [], out.done_ids(), out.done_ids(), ctx, finished)
        units = stage.plan(ctx)
        ids = [u.id for u in units]
        if len(set(ids)) != len(ids):
            raise StageError(f"{stage.name}: the plan repeats unit ids")
        for u in units:
            if not SHARD_RE.match(f"part-{u.id}.parquet"):
                raise StageError(f"{stage.name}: unit id {u.id!r} is not a shard id (5+ digits)")
        out.listing(refresh=True)
        done = [u.id for u in units if out.is_done(u.id)]
        jobs = [_Job(u.id, u, ins, out, _has_marker(out, u.id)) for u in units if not out.is_done(u.id)]
        return _Plan(stage, ins, out, jobs, done, ids, ctx)
    if not isinstance(stage, ShardStage):
        raise StageError(f"{type(stage).__name__} is neither a ShardStage nor a PlannedStage")
    if "input" not in ins:
        raise StageError(f"stage {stage.name} needs an input directory")
    prepare_output(stage, out, overwrite)
    todo, done = pending_shards(ins["input"], out)
    jobs = [_Job(s, None, ins, out, _has_marker(out, s)) for s in todo]
    return _Plan(stage, ins, out, jobs, done, ins["input"].done_ids())


def _has_marker(out: DatasetDir, shard_id: str) -> bool:
    return f"part-{shard_id}.done" in out.listing()


def finish_run(plan: _Plan, run_info: dict | None = None) -> dict:
    """Roll up (and, for a planned stage with every unit done, its `finish` step), after one re-listing."""
    if plan.finished is not None:
        return plan.finished
    out = plan.out.refresh()
    stats = write_rollup(out, plan.stage.name, plan.expected, run_info=run_info, write=False, refresh=False)
    if stats["complete"] and isinstance(plan.stage, PlannedStage):
        assert plan.ctx is not None
        fin = plan.stage.finish(plan.ctx, stats)
        if fin is not None:
            for name, data in sorted(fin.files.items()):
                if name in (ROLLUP, STAGE_META) or name.startswith("part-") or "/" in name:
                    raise StageError(f"{plan.stage.name}: finish() may not write {name!r}")
                out.put(name, data)
            stats.update({k: v for k, v in fin.stats.items() if k not in ("complete", "shards", "shards_done")})
    if stats["complete"]:
        out.write_json(ROLLUP, stats)
    return stats


# -- local -------------------------------------------------------------------------------------------------------


class LocalExecutor:
    name = "local"

    def run(self, stage: Stage, input_dir: InputsArg, output_dir: Any, overwrite: bool = False) -> RunSummary:
        plan = plan_run(stage, input_dir, output_dir, overwrite)
        for job in progress(plan.jobs, desc=stage.name, unit="shard"):
            execute_unit(stage, job)
        stats = finish_run(plan)
        return RunSummary(stage.name, plan.out.uri, [j.unit_id for j in plan.jobs], plan.done, stats)


# -- Ray ---------------------------------------------------------------------------------------------------------

# Failures of the machinery, not of the stage: the unit runs again (elsewhere) without using up its retries.
_SYSTEM_ERRORS = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
                  "RayActorError", "ActorDiedError", "ActorUnavailableError", "LocalRayletDiedError",
                  "TaskCancelledError", "ObjectFetchTimedOutError", "OutOfMemoryError")


def _is_system_error(exc: BaseException) -> bool:
    return isinstance(exc, _Timeout) or any(c.__name__ in _SYSTEM_ERRORS for c in type(exc).__mro__)


def _stage_error(exc: BaseException) -> Exception | None:
    """The error that means the run itself is wrong (bad config, missing weights, wrong input schema):
    raised at once, never retried. Ray wraps a task's exception; its `cause` is the original."""
    from schemas.base import SchemaError

    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, (StageError, SchemaError)):
            return e
    return None


def _ray_execute(stage: Stage, job: _Job, attempt: int) -> dict:
    return execute_unit(stage, job, attempt)


class _UnitWorker:
    """A model-stage actor: sets the stage up once, then runs whole units (read, compute, commit)."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def run(self, job: _Job, attempt: int) -> dict:
        return execute_unit(self.stage, job, attempt)

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class _Attempt:
    job: _Job
    attempt: int = 0
    system_failures: int = 0


class RayExecutor:
    name = "ray"

    def __init__(self, num_actors: int | None = None, actor_cpus: float = 0.5, actor_gpus: float = 0.0,
                 address: str | None = None, min_actors: int = 1, max_actors: int | None = None,
                 task_cpus: float = 1.0, task_timeout_s: float | None = None, task_retries: int = 2,
                 max_system_failures: int = 5):
        self.num_actors = num_actors
        self.actor_cpus = actor_cpus
        self.actor_gpus = actor_gpus
        self.address = address
        self.min_actors = max(1, min_actors)
        self.max_actors = max_actors
        self.task_cpus = task_cpus
        self.task_timeout_s = task_timeout_s
        self.task_retries = task_retries
        self.max_system_failures = max_system_failures
        self.last_run: dict = {}

    def run(self, stage: Stage, input_dir: InputsArg, output_dir: Any, overwrite: bool = False) -> RunSummary:
        from pipeline.runtime import init_ray

        init_ray(self.address)
        plan = plan_run(stage, input_dir, output_dir, overwrite)
        info = {"units": len(plan.jobs), "resubmitted": 0, "timed_out": 0, "failed": [], "workers": 0}
        if plan.jobs:
            if stage.uses_model:
                self._run_pool(stage, plan, info)
            else:
                self._run_tasks(stage, plan, info)
        self.last_run = info
        stats = finish_run(plan, run_info=info)
        if info["failed"]:
            raise StageError(
                f"{stage.name}: units {info['failed'][:20]} failed after {self.task_retries + 1} attempts "
                f"(first error: {info.get('first_error')}); the other shards are committed, re-run to retry"
            )
        return RunSummary(stage.name, plan.out.uri, [j.unit_id for j in plan.jobs], plan.done, stats,
                          info["resubmitted"], info["timed_out"], info["failed"])

    # -- shared bookkeeping ---------------------------------------------------------------------------------------
    def _after_failure(self, a: _Attempt, exc: BaseException, queue: deque, info: dict) -> None:
        se = _stage_error(exc)
        if se is not None:
            raise se
        if _is_system_error(exc):
            a.system_failures += 1
            if a.system_failures <= self.max_system_failures:
                info["resubmitted"] += 1
                log.warning("%s: unit %s lost (%s); running it again", "ray", a.job.unit_id, type(exc).__name__)
                queue.appendleft(a)
                return
        else:
            a.attempt += 1
            if a.attempt <= self.task_retries:
                info["resubmitted"] += 1
                log.warning("unit %s failed (%s: %s); attempt %d", a.job.unit_id, type(exc).__name__,
                            str(exc)[:300], a.attempt + 1)
                queue.append(a)
                return
        log.error("unit %s failed for good: %s", a.job.unit_id, str(exc)[:2000])
        info["failed"].append(a.job.unit_id)
        info.setdefault("first_error", f"{type(exc).__name__}: {str(exc)[:500]}")

    def _timed_out(self, started: float) -> bool:
        return self.task_timeout_s is not None and time.monotonic() - started > self.task_timeout_s

    # -- CPU stages: one task per unit ----------------------------------------------------------------------------
    def _task_slots(self) -> int:
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus // max(self.task_cpus, 1e-6)))

    def _run_tasks(self, stage: Stage, plan: _Plan, info: dict) -> None:
        import ray

        remote = ray.remote(_ray_execute)
        stage_ref = ray.put(stage)
        queue: deque[_Attempt] = deque(_Attempt(j) for j in plan.jobs)
        inflight: dict[Any, tuple[_Attempt, float]] = {}
        bar = progress(total=len(plan.jobs), desc=stage.name, unit="shard")
        slots, slots_at = self._task_slots(), time.monotonic()
        info["workers"] = slots
        try:
            while queue or inflight:
                if time.monotonic() - slots_at > 5.0:
                    slots, slots_at = self._task_slots(), time.monotonic()
                    info["workers"] = max(info["workers"], slots)
                while queue and len(inflight) < slots:
                    a = queue.popleft()
                    opts: dict[str, Any] = {"num_cpus": self.task_cpus, "max_retries": 0}
                    if a.job.unit is not None and a.job.unit.memory:
                        opts["memory"] = int(a.job.unit.memory)
                    ref = remote.options(**opts).remote(stage_ref, a.job, a.attempt)
                    inflight[ref] = (a, time.monotonic())
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    a, _t = inflight.pop(ref)
                    try:
                        ray.get(ref)
                        bar.update(1)
                    except Exception as exc:  # noqa: BLE001 (sorted by _after_failure)
                        self._after_failure(a, exc, queue, info)
                for ref, (a, started) in list(inflight.items()):
                    if self._timed_out(started):
                        log.warning("unit %s ran past %.0f s: cancelled, running it again", a.job.unit_id,
                                    self.task_timeout_s)
                        ray.cancel(ref, force=True)
                        inflight.pop(ref)
                        info["timed_out"] += 1
                        self._after_failure(a, _Timeout(a.job.unit_id), queue, info)
        except BaseException:
            for ref in inflight:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()

    # -- model stages: an actor pool ------------------------------------------------------------------------------
    def pool_size(self, pending: int, gpus_per_actor: float) -> int:
        import ray

        return actor_pool_size(ray.cluster_resources(), pending, self.num_actors, self.min_actors,
                               self.max_actors, self.actor_cpus, gpus_per_actor)

    def _gpus_per_actor(self) -> float:
        from pipeline.runtime import has_gpu

        if not self.actor_gpus:
            return 0.0
        # On a cluster the driver may have no GPU while worker nodes do: ask Ray, not only torch here.
        return self.actor_gpus if (has_gpu() or _cluster_gpus() > 0) else 0.0

    def _run_pool(self, stage: Stage, plan: _Plan, info: dict) -> None:
        import ray

        gpus = self._gpus_per_actor()
        size = self.pool_size(len(plan.jobs), gpus)
        opts: dict[str, Any] = {"num_cpus": self.actor_cpus, "max_restarts": 0, "max_task_retries": 0}
        if gpus:
            opts["num_gpus"] = gpus
        actor_cls = ray.remote(_UnitWorker).options(**opts)
        stage_ref = ray.put(stage)
        # Actors get work only once they are up: a replacement that cannot be placed yet (its node is gone
        # and the others are full) must not hold a unit hostage while live actors could run it.
        starting: dict[Any, Any] = {}
        idle: deque[Any] = deque()
        info["workers"] = size
        replacements = 0
        queue: deque[_Attempt] = deque(_Attempt(j) for j in plan.jobs)
        inflight: dict[Any, tuple[_Attempt, float, Any]] = {}
        bar = progress(total=len(plan.jobs), desc=stage.name, unit="shard")

        def start() -> None:
            actor = actor_cls.remote(stage_ref)
            starting[actor.ready.remote()] = actor

        def replace(actor: Any) -> None:
            nonlocal replacements
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 (already dead with its node)
                pass
            replacements += 1
            if replacements > 4 * size + self.max_system_failures:
                raise StageError(f"{stage.name}: {replacements} actors lost; the cluster is not healthy")
            start()

        for _ in range(size):
            start()
        try:
            while queue or inflight:
                while queue and idle:
                    a, actor = queue.popleft(), idle.popleft()
                    inflight[actor.run.remote(a.job, a.attempt)] = (a, time.monotonic(), actor)
                ready, _ = ray.wait(list(inflight) + list(starting), num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in starting:
                        actor = starting.pop(ref)
                        try:
                            ray.get(ref)
                            idle.append(actor)
                        except Exception as exc:  # noqa: BLE001 (lost while starting)
                            log.warning("%s: an actor was lost while starting (%s)", stage.name, type(exc).__name__)
                            replace(actor)
                        continue
                    a, _t, actor = inflight.pop(ref)
                    try:
                        ray.get(ref)
                        bar.update(1)
                        idle.append(actor)
                    except Exception as exc:  # noqa: BLE001 (sorted by _after_failure)
                        if _is_system_error(exc):
                            replace(actor)
                        else:
                            idle.append(actor)
                        self._after_failure(a, exc, queue, info)
                for ref, (a, started, actor) in list(inflight.items()):
                    if self._timed_out(started):
                        log.warning("unit %s ran past %.0f s: its actor is replaced and the unit run again",
                                    a.job.unit_id, self.task_timeout_s)
                        inflight.pop(ref)
                        info["timed_out"] += 1
                        replace(actor)
                        self._after_failure(a, _Timeout(a.job.unit_id), queue, info)
        finally:
            bar.close()
            for actor in list(idle) + list(starting.values()) + [v[2] for v in inflight.values()]:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass


def actor_pool_size(resources: Mapping[str, float], pending: int, num_actors: int | None = None,
                    min_actors: int = 1, max_actors: int | None = None, actor_cpus: float = 0.5,
                    gpus_per_actor: float = 0.0) -> int:
    """Actors for a model stage: `num_actors` if fixed, else what the cluster holds (GPUs / gpus_per_actor
    when GPUs are asked for, else CPUs / actor_cpus) within [min_actors, max_actors]; never above `pending`."""
    if num_actors:
        n = num_actors
    else:
        if gpus_per_actor > 0:
            n = int(float(resources.get("GPU", 0.0)) // gpus_per_actor)
        else:
            n = int(float(resources.get("CPU", 1.0)) // max(actor_cpus, 1e-6))
        n = max(min_actors, n)
        if max_actors:
            n = min(n, max_actors)
    return max(1, min(n, pending))


class _Timeout(Exception):
    """A unit ran past the executor's time limit (treated like a lost worker: run again)."""

    def __init__(self, unit_id: str):
        super().__init__(f"unit {unit_id} timed out")


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def make_executor(kind: str = "local", **kwargs: Any) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(**kwargs)
    raise StageError(f"unknown executor '{kind}': use 'local' or 'ray'")

