"""Executors: run a ShardStage over every pending shard of an input directory, honouring the contract.

- `LocalExecutor`: in-process, shard after shard (tests, debugging, tiny inputs).
- `RayExecutor`: model stages as one Ray Data `map_batches` over all pending shards with a class UDF in an
  actor pool (the model loads once per actor, CPUs left for the read tasks, GPUs only when present);
  CPU stages as one Ray task per shard. Output is streamed back to the driver, which commits each shard
  the moment all of its input rows are accounted for, so memory stays bounded and a kill loses at most
  the shards in flight.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.progress import progress
from pipeline.rollup import write_rollup
from pipeline.shards import DatasetDir, OutputClaimError, claim_output
from pipeline.stage import BatchResult, ShardStage, StageError, add_batch_stats, new_shard_stats

log = logging.getLogger(__name__)

SHARD_COL = "__shard"
ACCT_COL = "__acct"


@dataclass
class RunSummary:
    stage: str
    output: str
    processed: list[str]
    skipped: list[str]
    stats: dict


def prepare_output(stage: ShardStage, out: DatasetDir, overwrite: bool = False) -> None:
    """Check the output belongs to this stage and config; a different config must not mix shards."""
    out.root.mkdir(parents=True, exist_ok=True)
    out.clean_temporaries()
    meta = {"stage": stage.name, "config_hash": stage.config_hash()}
    try:
        changed = claim_output(out.root, meta, overwrite)
    except OutputClaimError as exc:
        raise StageError(f"{exc} (config differs)") from None
    if changed:
        for sid in out.shard_ids():
            out.marker(sid).unlink(missing_ok=True)
        (out.root / "stats.json").unlink(missing_ok=True)


def pending_shards(inp: DatasetDir, out: DatasetDir) -> tuple[list[str], list[str]]:
    ids = inp.done_ids()
    if not ids:
        raise StageError(
            f"no finished input shards in {inp.root}: run the previous stage first "
            "(webbody build ... --until STAGE) or point --input at its output"
        )
    done = [s for s in ids if out.is_done(s)]
    todo = [s for s in ids if not out.is_done(s)]
    return todo, done


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


def _concat(stage: ShardStage, parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return stage.output_schema.empty()
    parts = [stage.output_schema.validate(p, where=f"{stage.name} output") for p in parts]
    return pa.concat_tables(parts)


def run_shard(stage: ShardStage, inp: DatasetDir, out: DatasetDir, shard_id: str) -> dict:
    """Process one shard in this process and commit it (used by the local and Ray-task executors)."""
    stage.ensure_setup()
    t0 = time.perf_counter()
    table = inp.read_shard(shard_id)
    if stage.input_schema is not None:
        table = stage.input_schema.validate(table, where=str(inp.parquet(shard_id)))
    stats = new_shard_stats(stage.name, shard_id)
    parts = _process_table(stage, table, stats)
    result = stage.finalize_shard(_concat(stage, parts))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    out.commit_shard(shard_id, result, stats)
    return stats


class LocalExecutor:
    name = "local"

    def run(self, stage: ShardStage, input_dir: str | Path, output_dir: str | Path,
            overwrite: bool = False) -> RunSummary:
        inp, out = DatasetDir(input_dir), DatasetDir(output_dir)
        prepare_output(stage, out, overwrite)
        todo, done = pending_shards(inp, out)
        for sid in progress(todo, desc=stage.name, unit="shard"):
            run_shard(stage, inp, out, sid)
        stats = write_rollup(out, stage.name, inp.done_ids())
        return RunSummary(stage.name, str(out.root), todo, done, stats)


class _ActorUDF:
    """Ray Data class UDF: one stage instance (one model load) per actor."""

    def __init__(self, stage: ShardStage):
        stage.ensure_setup()
        self.stage = stage

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A batch may straddle two input shards; process each part on its own so accounting stays per shard.
        shards = batch.column(SHARD_COL)
        outs: list[pa.Table] = []
        for sid in pc.unique(shards).to_pylist():
            part = batch.filter(pc.equal(shards, sid)).drop_columns([SHARD_COL])
            result = safe_process(self.stage, part)
            data = self.stage.output_schema.validate(result.table) if result.n_out else None
            acct = json.dumps({"n_in": part.num_rows, "n_out": result.n_out, "drops": dict(result.drops)})
            outs.append(_tag(data, self.stage, sid, acct))
        return pa.concat_tables(outs, promote_options="permissive")


def _tag(data: pa.Table | None, stage: ShardStage, sid: str, acct: str) -> pa.Table:
    """Output rows tagged with their shard, followed by one accounting row (all data columns null)."""
    schema = pa.schema([f.with_nullable(True) for f in stage.output_schema.schema])
    acct_row = pa.Table.from_pydict({f.name: pa.nulls(1, f.type) for f in schema}, schema=schema)
    rows = [data.cast(schema)] if data is not None else []
    rows.append(acct_row)
    t = pa.concat_tables(rows)
    n = t.num_rows
    t = t.append_column(SHARD_COL, pa.array([sid] * n, pa.string()))
    return t.append_column(ACCT_COL, pa.array([None] * (n - 1) + [acct], pa.string()))


class RayExecutor:
    name = "ray"

    def __init__(self, num_actors: int = 1, actor_cpus: float = 0.5, actor_gpus: float = 0.0,
                 address: str | None = None):
        self.num_actors = num_actors
        self.actor_cpus = actor_cpus
        self.actor_gpus = actor_gpus
        self.address = address

    def run(self, stage: ShardStage, input_dir: str | Path, output_dir: str | Path,
            overwrite: bool = False) -> RunSummary:
        from pipeline.runtime import has_gpu, init_ray

        init_ray(self.address)
        inp, out = DatasetDir(input_dir), DatasetDir(output_dir)
        prepare_output(stage, out, overwrite)
        todo, done = pending_shards(inp, out)
        if todo:
            if stage.uses_model:
                # On a cluster the driver may have no GPU while worker nodes do: ask Ray, not only torch here.
                gpus = self.actor_gpus if (self.actor_gpus and (has_gpu() or _cluster_gpus() > 0)) else 0.0
                self._run_actor_pool(stage, inp, out, todo, gpus)
            else:
                self._run_tasks(stage, inp, out, todo)
        stats = write_rollup(out, stage.name, inp.done_ids())
        return RunSummary(stage.name, str(out.root), todo, done, stats)

    def _run_tasks(self, stage: ShardStage, inp: DatasetDir, out: DatasetDir, todo: list[str]) -> None:
        import ray

        remote = ray.remote(num_cpus=1)(run_shard)
        refs = {remote.remote(stage, inp, out, sid): sid for sid in todo}
        bar = progress(total=len(todo), desc=stage.name, unit="shard")
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # re-raise a task's StageError here
            bar.update(1)
        bar.close()

    def _run_actor_pool(self, stage: ShardStage, inp: DatasetDir, out: DatasetDir, todo: list[str],
                        gpus: float) -> None:
        import ray.data
        from ray.data import ActorPoolStrategy

        expected = {sid: inp.num_rows(sid) for sid in todo}
        for sid in [s for s, n in expected.items() if n == 0]:
            st = new_shard_stats(stage.name, sid)
            out.commit_shard(sid, stage.output_schema.empty(), st)
        live = [s for s, n in expected.items() if n > 0]
        if not live:
            return
        tables = []
        for sid in live:
            t = inp.read_shard(sid)
            if stage.input_schema is not None:
                t = stage.input_schema.validate(t, where=str(inp.parquet(sid)))
            tables.append(t.append_column(SHARD_COL, pa.array([sid] * t.num_rows, pa.string())))
        # Shards are read on the driver one at a time into Ray's object store, not all into driver memory.
        refs = [ray.put(t) for t in tables]
        del tables
        ds = ray.data.from_arrow_refs(refs)
        ds = ds.map_batches(
            _ActorUDF,
            fn_constructor_args=(stage,),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=self.num_actors),
            num_cpus=self.actor_cpus,
            num_gpus=gpus or None,
        )
        buffers: dict[str, list[pa.Table]] = defaultdict(list)
        stats = {sid: new_shard_stats(stage.name, sid) for sid in live}
        t0 = time.perf_counter()
        bar = progress(total=sum(expected[s] for s in live), desc=stage.name, unit="row")
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            acct_mask = pc.is_valid(batch.column(ACCT_COL))
            for row in batch.filter(acct_mask).select([SHARD_COL, ACCT_COL]).to_pylist():
                sid, acct = row[SHARD_COL], json.loads(row[ACCT_COL])
                st = stats[sid]
                st["rows_in"] += acct["n_in"]
                st["rows_out"] += acct["n_out"]
                st["drops"] = dict(sorted((Counter(st["drops"]) + Counter(acct["drops"])).items()))
                bar.update(acct["n_in"])
            data = batch.filter(pc.invert(acct_mask))
            for sid in pc.unique(batch.column(SHARD_COL)).to_pylist():
                part = data.filter(pc.equal(data.column(SHARD_COL), sid))
                if part.num_rows:
                    buffers[sid].append(part.drop_columns([SHARD_COL, ACCT_COL]))
                if stats[sid]["rows_in"] == expected[sid] and not out.is_done(sid):
                    stats[sid]["seconds"] = round(time.perf_counter() - t0, 3)
                    table = stage.finalize_shard(_concat(stage, buffers.pop(sid, [])))
                    out.commit_shard(sid, table, stats[sid])
        bar.close()
        missing = [s for s in live if not out.is_done(s)]
        if missing:
            raise StageError(f"{stage.name}: shards {missing} did not receive all their rows")


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def make_executor(kind: str = "local", **kwargs: Any):
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(**kwargs)
    raise StageError(f"unknown executor '{kind}': use 'local' or 'ray'")
