"""A small build run in a subprocess by the kill tests: a query-like stage writing shards, then a slow
per-shard stage on the local or Ray executor. Usage: python -m tests.kill_target OUT [local|ray]"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import BatchResult, ShardStage
from tests.faults import toy_schema

IN = toy_schema("kill_in")
OUT = toy_schema("kill_out", "y", pa.string())


class SlowHash(ShardStage):
    name = "slowhash"
    input_schema = IN
    output_schema = OUT
    uses_model = True

    @property
    def batch_size(self) -> int:
        return 4

    def process(self, batch: pa.Table) -> BatchResult:
        time.sleep(0.05)  # long enough that kills land mid-shard
        rows, drops = [], Counter()
        for r in batch.to_pylist():
            if r["x"] % 7 == 0:
                drops["multiple_of_7"] += 1
                continue
            # several output rows per input row, to exercise ordering
            rows += [{"sample_id": f"{r['sample_id']}/{k}", "y": str(r["x"] * 31 + k)} for k in range(r["x"] % 3)]
        return BatchResult(OUT.from_rows(rows), drops)


def write_inputs(root: Path, n_shards: int = 12, rows: int = 20) -> None:
    d = DatasetDir(root)
    d.clean_temporaries()  # as every stage does on its output before writing
    for s in range(n_shards):
        sid = format_shard_id(s)
        if d.is_done(sid):
            continue
        t = IN.from_rows([{"sample_id": f"{sid}-{i:04d}", "x": s * rows + i} for i in range(rows)])
        d.commit_shard(sid, t, {"rows_in": rows, "rows_out": rows, "drops": {}})


def main() -> None:
    out = Path(sys.argv[1])
    kind = sys.argv[2] if len(sys.argv) > 2 else "local"
    write_inputs(out / "input")
    ex = LocalExecutor() if kind == "local" else RayExecutor(num_actors=1, actor_cpus=0.5)
    ex.run(SlowHash(), out / "input", out / "output")
    print("DONE")


if __name__ == "__main__":
    from pipeline.runtime import ensure_offline_env

    ensure_offline_env()
    main()
