"""The stage contract: atomic shards, markers, resume, stats, roll-up, config guard, both executors."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import BatchResult, ShardStage, StageError
from schemas.base import SchemaError
from tests.faults import toy_schema

IN = toy_schema("test_in")
OUT = toy_schema("test_out", "y")


class Square(ShardStage):
    """Keeps even x (as x*x), drops odd x as `odd` and negatives as `negative`."""

    name = "square"
    input_schema = IN
    output_schema = OUT
    uses_model = True

    def process(self, batch: pa.Table) -> BatchResult:
        rows, drops = [], Counter()
        for r in batch.to_pylist():
            if r["x"] < 0:
                drops["negative"] += 1
            elif r["x"] % 2:
                drops["odd"] += 1
            else:
                rows.append({"sample_id": r["sample_id"], "y": r["x"] * r["x"]})
        return BatchResult(OUT.from_rows(rows), drops)


def make_input(root, n_shards=3, rows=10) -> DatasetDir:
    d = DatasetDir(root)
    for s in range(n_shards):
        sid = format_shard_id(s)
        xs = [s * rows + i - 2 for i in range(rows)]
        t = IN.from_rows([{"sample_id": f"{sid}-{i:03d}", "x": x} for i, x in enumerate(xs)])
        d.commit_shard(sid, t, {"rows_in": rows, "rows_out": rows, "drops": {}})
    return d


def read_all(d: DatasetDir) -> list[dict]:
    return [r for _, t in d.iter_tables() for r in t.to_pylist()]


def test_local_executor_writes_shards_stats_and_markers(tmp_path):
    make_input(tmp_path / "in")
    summary = LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "out")
    out = DatasetDir(tmp_path / "out")
    assert out.done_ids() == ["00000", "00001", "00002"]
    rows = read_all(out)
    expected = {s * 10 + i - 2 for s in range(3) for i in range(10)}
    assert sorted(r["y"] for r in rows) == sorted(x * x for x in expected if x >= 0 and x % 2 == 0)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rows_in"] == 30
    assert stats["rows_out"] == len(rows) == 14
    assert stats["drops"] == {"negative": 2, "odd": 14}
    assert summary.processed == ["00000", "00001", "00002"]
    # a second run skips everything
    again = LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "out")
    assert again.processed == [] and again.skipped == ["00000", "00001", "00002"]


def test_unfinished_shard_is_redone(tmp_path):
    make_input(tmp_path / "in")
    LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "out")
    out = DatasetDir(tmp_path / "out")
    before = read_all(out)
    out.marker("00001").unlink()  # as if killed between the stats and the marker
    (tmp_path / "out" / ".part-00002.parquet.abc.tmp").write_bytes(b"half")  # a killed writer's leftover
    summary = LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "out")
    assert summary.processed == ["00001"]
    assert read_all(out) == before
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_config_change_is_refused(tmp_path):
    make_input(tmp_path / "in")
    LocalExecutor().run(Square(config={"a": 1}), tmp_path / "in", tmp_path / "out")
    with pytest.raises(StageError, match="config"):
        LocalExecutor().run(Square(config={"a": 2}), tmp_path / "in", tmp_path / "out")
    LocalExecutor().run(Square(config={"a": 2}), tmp_path / "in", tmp_path / "out", overwrite=True)


def test_wrong_input_schema_names_column(tmp_path):
    d = DatasetDir(tmp_path / "in")
    bad = pa.table({"sample_id": ["a"], "z": [1]})
    d.commit_shard("00000", bad, {})
    with pytest.raises(SchemaError, match="'x'"):
        LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "out")


def test_ray_actor_pool_matches_local(tmp_path, ray_local):
    make_input(tmp_path / "in", n_shards=4, rows=25)
    LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "local")
    s = Square()
    s.config = None
    RayExecutor(num_actors=1, actor_cpus=0.5).run(s, tmp_path / "in", tmp_path / "ray")
    local, ray_out = DatasetDir(tmp_path / "local"), DatasetDir(tmp_path / "ray")
    for sid in local.done_ids():
        assert local.parquet(sid).read_bytes() == ray_out.parquet(sid).read_bytes()
        assert local.shard_stats(sid)["drops"] == ray_out.shard_stats(sid)["drops"]


def test_ray_tasks_for_cpu_stage(tmp_path, ray_local):
    make_input(tmp_path / "in")

    class CpuSquare(Square):
        uses_model = False

    RayExecutor().run(CpuSquare(), tmp_path / "in", tmp_path / "out")
    assert DatasetDir(tmp_path / "out").done_ids() == ["00000", "00001", "00002"]


class StallOnce(Square):
    """A CPU stage whose shard 00001 stalls far past the time limit on its first attempt only."""

    uses_model = False

    def process(self, batch: pa.Table) -> BatchResult:
        import time
        from pathlib import Path

        probe = Path(self.config["probe"])
        sid = batch.column("sample_id")[0].as_py().split("-")[0]
        first = not (probe / f"{sid}.started").exists()
        (probe / f"{sid}.started").write_text("1")
        if sid == "00001" and first:
            time.sleep(600)  # cancelled at the time limit long before
        return super().process(batch)

    @property
    def batch_size(self) -> int:
        return 1000


def test_ray_tasks_time_limit_resubmits_and_in_flight_is_cluster_cpus(tmp_path, ray_local):
    import ray

    make_input(tmp_path / "in", n_shards=5, rows=4)
    LocalExecutor().run(Square(), tmp_path / "in", tmp_path / "ref")
    probe = tmp_path / "probe"
    probe.mkdir()
    stage = StallOnce(config={"probe": str(probe)})
    stage.config_hash = Square().config_hash
    ex = RayExecutor(task_timeout_s=30, task_retries=0)  # generous: worker start-up counts, and CI is loaded
    summary = ex.run(stage, tmp_path / "in", tmp_path / "out")
    assert summary.timed_out == 1 and summary.resubmitted == 1 and summary.failed == []
    assert ex.last_run["workers"] == int(ray.cluster_resources()["CPU"])  # tasks in flight = cluster CPUs
    ref, out = DatasetDir(tmp_path / "ref"), DatasetDir(tmp_path / "out")
    for sid in ref.done_ids():
        assert ref.parquet(sid).read_bytes() == out.parquet(sid).read_bytes()


def test_actor_pool_is_sized_from_the_cluster():
    from pipeline.executors import actor_pool_size

    paper = {"CPU": 64 * 8 + 20 * 32, "GPU": 64.0}
    assert actor_pool_size(paper, 10_000, None, 1, 512, 2, 0.5) == 128  # every GPU used, 2 actors each
    assert actor_pool_size(paper, 10_000, None, 1, 100, 2, 0.5) == 100  # max_actors caps it
    assert actor_pool_size(paper, 7, None, 1, 512, 2, 0.5) == 7  # never more actors than pending shards
    assert actor_pool_size({"CPU": 6.0}, 50, None, 1, None, 0.5, 0.0) == 12  # no GPUs: CPUs / actor_cpus
    assert actor_pool_size({"CPU": 0.0}, 50, None, 2, None, 0.5, 0.0) == 2  # min_actors
    assert actor_pool_size(paper, 50, 3, 1, None, 2, 0.5) == 3  # a fixed size wins
