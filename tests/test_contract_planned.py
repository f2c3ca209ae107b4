"""The planned-stage contract: plan on the driver, units on workers, extra objects and the finish step
committed by the executor, resume, config guard, failures counted; local and Ray byte-identical."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import FinishResult, PlannedStage, StageError, UnitResult, WorkUnit
from schemas.base import TableSchema

IN = TableSchema("p_in", 1, pa.schema([pa.field("sample_id", pa.string(), False), pa.field("x", pa.int64())]))
OUT = TableSchema("p_out", 1, pa.schema([pa.field("sample_id", pa.string(), False), pa.field("total", pa.int64())]))


class PairSums(PlannedStage):
    """Each unit sums two input shards' x per parity; writes a small text object with the shard."""

    name = "pair_sums"
    output_schema = OUT

    def plan(self, ctx):
        ids = ctx.inputs["nums"].done_ids()
        return [WorkUnit(format_shard_id(i // 2), {"shards": ids[i:i + 2]}, memory=1 << 20)
                for i in range(0, len(ids), 2)]

    def run_unit(self, unit, ctx):
        assert ctx.local_tmp.is_dir() and not ctx.output.is_done(unit.id)
        fail = (self.config or {}).get("fail")
        if fail == "stage":
            raise StageError("the run is wrong")
        if fail == "flaky" and ctx.attempt == 0 and unit.id == "00001":
            raise OSError("a transient error")
        rows, n, drops = Counter(), 0, Counter()
        for sid in unit.payload["shards"]:
            t = ctx.inputs["nums"].read_shard(sid, verify=True)
            n += t.num_rows
            for x in t.column("x").to_pylist():
                if x < 0:
                    drops["negative"] += 1
                else:
                    rows["even" if x % 2 == 0 else "odd"] += x
        table = OUT.from_rows([{"sample_id": f"{unit.id}-{k}", "total": v} for k, v in rows.items()])
        note = ctx.local_tmp / "note.txt"
        note.write_text(",".join(unit.payload["shards"]))
        return UnitResult(table, rows_in=n, drops=drops, files={f"note-{unit.id}.txt": note},
                          extra_stats={"inputs": len(unit.payload["shards"])})

    def finish(self, ctx, rollup):
        totals = sum(sum(t.column("total").to_pylist()) for _, t in ctx.output.refresh().iter_tables())
        return FinishResult(files={"summary.json": json.dumps({"total": totals}).encode()}, stats={"total": totals})


def make_nums(root: Path, n_shards: int = 5, rows: int = 6) -> DatasetDir:
    d = DatasetDir(root)
    for s in range(n_shards):
        sid = format_shard_id(s)
        t = IN.from_rows([{"sample_id": f"{sid}-{i}", "x": s * rows + i - 3} for i in range(rows)])
        d.commit_shard(sid, t, {"rows_in": rows, "rows_out": rows, "drops": {}})
    return d


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.endswith("stats.json")}


def test_planned_stage_local(tmp_path):
    make_nums(tmp_path / "in")
    s = LocalExecutor().run(PairSums(), {"nums": tmp_path / "in"}, tmp_path / "out")
    out = DatasetDir(tmp_path / "out")
    assert s.processed == ["00000", "00001", "00002"] and out.done_ids() == s.processed
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == 30 and stats["drops"] == {"negative": 3} and stats["complete"]
    expected_total = sum(x for x in range(-3, 27) if x >= 0)
    assert stats["total"] == expected_total
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"total": expected_total}
    assert (tmp_path / "out" / "note-00002.txt").read_text() == "00004"
    marker = json.loads((tmp_path / "out" / "part-00001.done").read_text())
    assert marker["files"]["note-00001.txt"]["bytes"] == len("00002,00003")
    assert out.shard_stats("00001")["inputs"] == 2
    assert not (tmp_path / "out" / "_work").exists()
    # resume: only the unit whose marker is missing runs again, with the same bytes
    before = _files(tmp_path / "out")
    (tmp_path / "out" / "part-00001.done").unlink()
    again = LocalExecutor().run(PairSums(), {"nums": tmp_path / "in"}, tmp_path / "out")
    assert again.processed == ["00001"] and again.skipped == ["00000", "00002"]
    assert _files(tmp_path / "out") == before
    # another config is refused, then redone with overwrite
    with pytest.raises(StageError, match="config"):
        LocalExecutor().run(PairSums({"v": 2}), {"nums": tmp_path / "in"}, tmp_path / "out")
    LocalExecutor().run(PairSums({"v": 2}), {"nums": tmp_path / "in"}, tmp_path / "out", overwrite=True)


def test_stage_error_stops_the_run(tmp_path):
    make_nums(tmp_path / "in", n_shards=2)
    with pytest.raises(StageError, match="the run is wrong"):
        LocalExecutor().run(PairSums({"fail": "stage"}), {"nums": tmp_path / "in"}, tmp_path / "out")
    assert DatasetDir(tmp_path / "out").done_ids() == []


def test_planned_stage_ray_matches_local_and_retries(tmp_path, ray_local):
    make_nums(tmp_path / "in")
    LocalExecutor().run(PairSums(), {"nums": tmp_path / "in"}, tmp_path / "local")
    ex = RayExecutor(task_retries=1)
    # A unit that fails once with a transient error is run again (counted); the output is the same.
    flaky = PairSums({"fail": "flaky"})
    flaky.config_hash = PairSums().config_hash  # same claim as the reference, so _stage.json matches too
    summary = ex.run(flaky, {"nums": tmp_path / "in"}, tmp_path / "ray")
    assert summary.resubmitted == 1 and summary.failed == []
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")
    assert json.loads((tmp_path / "ray" / "stats.json").read_text())["run"]["resubmitted"] == 1


class WritesScratch(PairSums):
    """A unit whose tool writes files under its scratch prefix (`work_uri`) itself."""

    name = "writes_scratch"

    def run_unit(self, unit, ctx):
        from pipeline import storage

        storage.put_bytes(storage.join(ctx.work_uri, "tool-output.bin"), b"scratch")
        return super().run_unit(unit, ctx)


def test_scratch_prefix_removed_for_stages_that_declare_it(tmp_path):
    make_nums(tmp_path / "in", n_shards=2)
    WritesScratch.uses_work_prefix = False
    LocalExecutor().run(WritesScratch(), {"nums": tmp_path / "in"}, tmp_path / "kept")
    assert (tmp_path / "kept" / "_work" / "00000" / "tool-output.bin").exists()  # not declared: left alone
    WritesScratch.uses_work_prefix = True
    try:
        LocalExecutor().run(WritesScratch(), {"nums": tmp_path / "in"}, tmp_path / "out")
    finally:
        WritesScratch.uses_work_prefix = False
    assert not (tmp_path / "out" / "_work" / "00000").exists()
    assert DatasetDir(tmp_path / "out").done_ids() == ["00000"]
