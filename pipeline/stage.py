"""The stage contract: a stage computes; the executor claims, commits, counts, resumes and rolls up.

Every stage declares its work in one of two ways, and NOTHING else: no stage writes files, markers or
stats itself (pipeline/executors.py does, through pipeline/shards.py and pipeline/storage.py).

1. `ShardStage` (per-shard; persons, faces): input shard `NNNNN` -> output shard `NNNNN`.
   `setup()` loads models once per worker; `process(batch) -> BatchResult(table, drops)` is pure. The
   executor feeds each pending input shard in batches of `batch_size`, concatenates, validates and sorts
   the output (`finalize_shard`) and commits it.

2. `PlannedStage` (planned or global; query, download's manifest shards, clean's per-name shards,
   bundle's pack tasks): on the driver, `plan(ctx) -> list[WorkUnit]` returns SMALL work units, each
   naming the output shard id it produces and a JSON-able `payload` (input shard ids, name ranges, row
   counts; never rows or images). On a worker, `run_unit(unit, ctx) -> UnitResult` reads what it needs
   from `ctx.inputs` (DatasetDirs on any storage), computes, and returns the output table, rows in, drop
   counts, and optionally extra objects (`files`: name -> bytes, or a finished local file such as a tar
   shard) that the executor commits with the shard, before its marker. After every unit is done,
   `finish(ctx, rollup)` (driver side, optional) may return a `FinishResult` with global objects (an
   index, centers) and extra roll-up fields; the executor commits them before `stats.json`.

Rules for both kinds (the executor enforces them, identically on the local and the Ray executor):
- The unit of resume is the output shard: a shard with a marker is skipped; a unit's output is a pure
  function of its payload, the config and the inputs, so a re-run (after a kill, on another node) gives
  the same bytes. Plans must be deterministic.
- `_stage.json` holds the stage name and `config_hash()` (planned stages add `input_hash(ctx)`, by default
  a fingerprint of the input directories' finished shards): a different config never mixes shards;
  `overwrite` discards the old run.
- Bad rows are counted under a reason (`drops`); an unexpected exception in `process` drops its batch
  as `error_<Type>`; `StageError` means the run itself is wrong and stops it with a clear message.
- `uses_model = True`: the Ray executor runs the stage in an actor pool (one `setup()` per actor, sized
  from the cluster's GPUs/CPUs); otherwise one Ray task per unit. `WorkUnit.memory` (bytes) is passed to
  Ray as the task's `memory=` so big units are not packed onto one node.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from schemas.base import TableSchema

if TYPE_CHECKING:
    from pipeline.shards import DatasetDir


@dataclass
class BatchResult:
    """What `process` returns for one input batch."""

    table: pa.Table
    drops: Counter = field(default_factory=Counter)  # reason -> number of input rows dropped

    @property
    def n_out(self) -> int:
        return self.table.num_rows


class StageError(RuntimeError):
    """The run is wrong (bad config, missing weights, incompatible input): fail fast with what to do."""


class Stage:
    """What both kinds of stage share: a name, an output schema, a config, a once-per-worker setup."""

    name: ClassVar[str] = "stage"
    output_schema: ClassVar[TableSchema]
    # Output rows of a shard are sorted by these columns, so a shard's bytes never depend on batch order.
    sort_keys: ClassVar[tuple[str, ...]] = ("sample_id",)
    # Model stages run in an actor pool (one model load per actor); others as plain tasks.
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config
        self._ready = False

    def setup(self) -> None:
        """Load models and other heavy state. Called once per worker before the first batch or unit."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def config_hash(self) -> str:
        return config_hash(self.config)

    def finalize_shard(self, table: pa.Table) -> pa.Table:
        """Validate and deterministically order one shard's output."""
        table = self.output_schema.validate(table, where=f"{self.name} output")
        keys = [k for k in self.sort_keys if k in table.column_names]
        if keys and table.num_rows > 1:
            table = table.sort_by([(k, "ascending") for k in keys])
        return table


class ShardStage(Stage):
    """Base class of per-shard stages. Subclasses set the class attributes and implement `process`."""

    input_schema: ClassVar[TableSchema | None] = None

    # -- to implement -------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> BatchResult:
        raise NotImplementedError

    # -- used by executors ----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(getattr(self.config, "batch_size", 64) or 64)


@dataclass(frozen=True)
class WorkUnit:
    """One unit of a planned stage: the output shard it commits and what the worker needs to know.

    `payload` must stay small and JSON-able (ids, ranges, counts): the driver holds every unit.
    """

    id: str  # the output shard id (pipeline.shards.format_shard_id), unique within the plan
    payload: Mapping[str, Any] = field(default_factory=dict)
    memory: int | None = None  # bytes the unit needs at peak (Ray `memory=`), None = no reservation


@dataclass
class UnitResult:
    """What `run_unit` returns: the output shard's rows, its accounting, and objects to commit with it."""

    table: pa.Table
    rows_in: int = 0
    drops: Counter = field(default_factory=Counter)
    files: dict[str, bytes | Path] = field(default_factory=dict)  # name -> bytes or a finished local file
    extra_stats: dict[str, Any] = field(default_factory=dict)  # small JSON merged into the shard's stats


@dataclass
class FinishResult:
    """What `finish` returns: global objects of the stage and extra roll-up fields."""

    files: dict[str, bytes | Path] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanContext:
    """What `plan` and `finish` see (driver side): the input directories and the output (read only)."""

    inputs: dict[str, DatasetDir]
    output: DatasetDir


@dataclass
class UnitContext:
    """What `run_unit` sees (worker side).

    `inputs`/`output` are DatasetDirs on any storage (read only: the executor commits). `local_tmp` is
    an empty local folder for this attempt, deleted after the commit. `work_uri` is a per-unit scratch
    prefix under the output (`_work/<id>`) for tools that write files themselves; the executor deletes it
    after the commit when the stage sets `uses_work_prefix`.
    """

    inputs: dict[str, DatasetDir]
    output: DatasetDir
    local_tmp: Path
    work_uri: str
    attempt: int = 0


class PlannedStage(Stage):
    """Base class of planned (and global) stages: `plan` on the driver, `run_unit` on workers."""

    # True for a stage whose tools write files under `UnitContext.work_uri` themselves: the executor then
    # deletes that prefix after each commit (a listing and deletes on object stores, so not for the rest).
    uses_work_prefix: ClassVar[bool] = False

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        raise NotImplementedError

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        raise NotImplementedError

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult | None:
        """Optional global step once every unit is committed (driver side). Default: nothing."""
        return None

    def owns(self, name: str) -> bool:
        """Whether the output object `name` is one of this stage's extra (`UnitResult.files`) or `finish` objects:
        removed with the shards when `overwrite` discards an earlier run. Default: none."""
        return False

    def input_hash(self, ctx: PlanContext) -> str | None:
        """Identity of the inputs for the config guard. Default: the input directories' finished shards."""
        if not ctx.inputs:
            return None
        return config_hash({k: d.fingerprint() for k, d in sorted(ctx.inputs.items())})


def config_hash(config: Any) -> str:
    """A short stable hash of a config (pydantic model, dataclass, dict or None)."""
    if config is None:
        payload: Any = None
    elif hasattr(config, "model_dump"):
        payload = config.model_dump(mode="json")
    elif hasattr(config, "__dataclass_fields__"):
        from dataclasses import asdict

        payload = asdict(config)
    else:
        payload = config
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def new_shard_stats(stage: str, shard_id: str) -> dict:
    return {"stage": stage, "shard": shard_id, "rows_in": 0, "rows_out": 0, "drops": {}, "seconds": 0.0}


def add_batch_stats(stats: dict, n_in: int, result: BatchResult) -> None:
    stats["rows_in"] += n_in
    stats["rows_out"] += result.n_out
    drops = Counter(stats["drops"])
    drops.update({k: v for k, v in result.drops.items() if v})
    stats["drops"] = dict(sorted(drops.items()))
