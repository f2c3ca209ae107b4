"""The stage contract: a small class with one job, run over parquet shards by a swappable executor.

A `ShardStage` maps each input shard to the output shard with the same id: `setup()` loads models once
per worker, `process(batch)` is pure and returns the output rows plus a count per drop reason. Executors
(`pipeline.executors`) decide where it runs (in-process, Ray tasks, a Ray Data actor pool) and enforce the
contract: atomic shard writes, stats, completion markers, resume, and the `stats.json` roll-up.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from schemas.base import TableSchema


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


class ShardStage:
    """Base class of per-shard stages. Subclasses set the class attributes and implement `process`."""

    name: ClassVar[str] = "stage"
    input_schema: ClassVar[TableSchema | None] = None
    output_schema: ClassVar[TableSchema]
    # Output rows of a shard are sorted by these columns, so a shard's bytes never depend on batch order.
    sort_keys: ClassVar[tuple[str, ...]] = ("sample_id",)
    # Model stages run in an actor pool (one model load per actor); others as plain tasks.
    uses_model: ClassVar[bool] = False

    def __init__(self, config: Any = None):
        self.config = config
        self._ready = False

    # -- to implement -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models and other heavy state. Called once per worker before the first batch."""

    def process(self, batch: pa.Table) -> BatchResult:
        raise NotImplementedError

    # -- used by executors ----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(getattr(self.config, "batch_size", 64) or 64)

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
