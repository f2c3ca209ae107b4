"""The bundle as a `PlannedStage` (pipeline/stage.py): plan on the driver, one pack task per window, and a
`finish` step for the index and the centers. The executor (pipeline/executors.py) does everything else:
claims the folder (`_stage.json`), commits each window (its shards, then its index part, stats and marker
last: PUTs on object stores), resumes by markers, runs the windows on Ray with per-task time limits and
resubmission, and writes `stats.json` (its roll-up plus the fields `finish` returns).

A unit's payload is compact (per identity of its window, not per sample; `BundlePlan.window_payload`): the
pack task re-derives its window's samples from the clean and persons shards it reads anyway
(`plan.plan_window`) and checks them against the planner's digest, so the driver never ships sample lists.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from pipeline.bundle.layout import (
    CENTERS,
    INDEX,
    centers_table,
    index_of,
    key_hash,
    parquet_bytes,
    removed_hashes,
    sibling_funnel,
    summarize,
)
from pipeline.bundle.pack import build_config_hash, pack_window, pipeline_version
from pipeline.bundle.plan import BundlePlan, Planned, build_plan, plan_window
from pipeline.bundle.writers import get_writer
from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import (
    FinishResult,
    PlanContext,
    PlannedStage,
    StageError,
    UnitContext,
    UnitResult,
    WorkUnit,
    config_hash,
)
from schemas.bundle import BUNDLE_INDEX

NEEDS = ("clean", "persons", "faces")


class BundleStage(PlannedStage):
    name = "bundle"
    output_schema = BUNDLE_INDEX
    sort_keys = ("shard", "position")

    def __init__(self, cfg: BuildConfig):
        super().__init__(cfg.bundle)
        self.version = pipeline_version()
        self.build_hash = build_config_hash(cfg)  # what every record carries (`config_hash`)
        self._plan: BundlePlan | None = None  # driver side only: never shipped to workers
        self._removed: dict[str, Any] = {}
        self.writer = get_writer(cfg.bundle.writer)  # registered by then: built in, or by a `plugins` module

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plan": None, "_removed": {}}

    def config_hash(self) -> str:
        # The records carry the pipeline version and the build's config hash: either changing changes the bytes.
        return config_hash({"config": self.build_hash, "version": self.version})

    def owns(self, name: str) -> bool:
        return self.writer.is_shard(name) or name in (INDEX, CENTERS, "report.html")

    # -- driver ---------------------------------------------------------------------------------------------------
    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        missing = [k for k in NEEDS if k not in ctx.inputs]
        if missing:
            raise StageError(f"bundle needs the {missing} output(s) (inputs: {sorted(ctx.inputs)})")
        # Opt-outs applied by `webbody remove` stay applied: their samples are never written again. Filtering
        # after the shard assignment keeps every other sample in the shard and position it already has.
        removed = removed_hashes(ctx.output, ctx.output.listing())
        plan = build_plan(self.config, *(ctx.inputs[k].uri for k in NEEDS), removed=removed["keys"])
        for ident in [i for i in plan.centers if key_hash(i) in removed["identities"]]:
            del plan.centers[ident]
        self._plan, self._removed = plan, removed
        memory = self.config.pack_memory_mb << 20  # Ray places no more pack tasks on a node than its memory holds
        return [WorkUnit(format_shard_id(w), plan.window_payload(w, samples, removed["keys"]), memory=memory)
                for w, samples in sorted(plan.by_window().items())]

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        assert self._plan is not None, "finish() runs after plan() on the driver"
        plan, out = self._plan, ctx.output  # listed afresh by the executor just before finish()
        ids = out.done_ids()
        index = index_of([out.read_shard(sid) for sid in ids])
        tars: dict[str, dict] = {}
        unit_drops: Counter = Counter()
        for sid in ids:
            st = out.shard_stats(sid)
            tars.update(st.get("tars", {}))
            unit_drops.update(st.get("drops", {}))
        removed = self._removed
        extra = {
            "rows_in": plan.rows_in,
            "plan_drops": dict(plan.drops),
            "pipeline_version": self.version,
            "config_hash": self.build_hash,
            "plan": plan.digest(),
            "image_size": self.config.image_size,
            "writer": self.writer.describe(),
            "split_plan": plan.splits.stats,
            "funnel": sibling_funnel(out),
            "removals": {"requests": removed.get("requests", 0), "samples": len(removed.get("keys", ()))},
        }
        stats = summarize(index, tars, extra)
        return FinishResult(files={INDEX: parquet_bytes(index), CENTERS: parquet_bytes(centers_table(plan.centers))},
                            stats=stats)

    # -- worker ---------------------------------------------------------------------------------------------------
    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        payload = unit.payload
        planned = plan_window(dict(payload), self.config, ctx.inputs["clean"].uri, ctx.inputs["persons"].uri)
        shards: dict[str, list[Planned]] = {}
        for p in planned:
            shards.setdefault(p.shard, []).append(p)
        index, files, tars = pack_window(ctx.local_tmp, shards, ctx.inputs["persons"].uri, ctx.inputs["faces"].uri,
                                         self.config, self.version, self.build_hash, self.writer, payload["vouched"])
        drops: Counter = Counter()
        for st in tars.values():
            drops.update(st["drops"])
        return UnitResult(index, rows_in=len(planned), drops=drops, files=dict(files), extra_stats={"tars": tars})


def run_bundle(cfg: BuildConfig, inputs: dict[str, str | os.PathLike], output: str | os.PathLike,
               overwrite: bool = False) -> dict:
    from pipeline.executors import LocalExecutor
    from pipeline.registry import executor_from_config, load_plugins

    load_plugins(cfg)  # a user output writer registers itself at import
    missing = [k for k in NEEDS if k not in inputs]
    if missing:
        raise StageError(f"bundle needs the '{missing[0]}' output (inputs: {sorted(inputs)})")
    # One window needs no Ray start-up (the demo, small builds): run it in-process.
    windows = -(-len(DatasetDir(inputs["clean"]).done_ids()) // cfg.bundle.pack_window)
    executor = executor_from_config(cfg) if cfg.run.executor == "ray" and windows > 1 else LocalExecutor()
    summary = executor.run(BundleStage(cfg), {k: os.fspath(inputs[k]) for k in NEEDS}, output, overwrite)
    return summary.stats
