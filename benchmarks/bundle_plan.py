"""Bundle planning is linear in shards: planning 2,000 vs 500 tiny input shards (time ratio and marker checks).

    .venv/bin/python benchmarks/bundle_plan.py [--small 500 --large 2000 --pairs 5] [--workdir DIR]

Builds two synthetic builds (persons/faces/clean, one kept sample per shard, `tests/bundle_support.py`), then
times `build_plan` on both, interleaved in alternating order (`benchmarks/paired.py`), and counts every
filesystem call planning makes through a wrapped filesystem (`CountingFS`): listings, marker reads, data opens.
Targets (issue #12): time(2000) / time(500) <= 4.5 and marker checks <= 3 x shards. Writes
benchmarks/results/bundle_plan.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()


def make(root: Path, shards: int) -> dict[str, Path]:
    from tests.bundle_support import make_build

    # one kept sample per shard (plus `dropped` clean-rejected rows spread over the first shards)
    return make_build(root, n_ids=shards // 10, per_id=10, n_shards=shards, dropped=0)


def counted_plan(inputs: dict[str, Path], cfg) -> dict:
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.bundle.plan import build_plan
    from pipeline.bundle.store import CountingFS, Store

    fs = CountingFS(LocalFileSystem())
    plan = build_plan(cfg, *(Store(str(inputs[k]), fs=fs) for k in ("clean", "persons", "faces")))
    markers = sum(1 for op, p in fs.paths if p.endswith(".done"))
    listings = fs.calls.get("ls", 0)
    return {"samples": len(plan.samples), "calls": dict(sorted(fs.calls.items())), "marker_checks": markers,
            "listings": listings, "data_opens": sum(1 for op, p in fs.paths if op == "open")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from benchmarks.paired import Recorder, headline, paired_ratio
    from pipeline.bundle.plan import build_plan
    from tests.bundle_support import small_config

    rec = Recorder("bundle_plan", args, packages=("pyarrow", "fsspec", "numpy"))
    cfg = small_config(test_identities=2).bundle
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small, large = make(Path(tmp) / "small", args.small), make(Path(tmp) / "large", args.large)

        def plan_of(inputs):
            return lambda: build_plan(cfg, inputs["clean"], inputs["persons"], inputs["faces"])

        # A = small, B = large: with no work functions the ratio is time(B) / time(A) = time(large) / time(small)
        paired = paired_ratio(plan_of(small), plan_of(large), pairs=args.pairs, clock="wall")
        counts = {"small": counted_plan(small, cfg), "large": counted_plan(large, cfg)}
    big = counts["large"]
    per_shard = big["marker_checks"] / args.large
    rec.write(
        headlines={
            "plan_time_ratio_large_vs_small": paired.summary(
                unit="x", target="<= 4.5",
                note=f"time to plan {args.large} shards / {args.small} shards (linear = {args.large / args.small:g})"),
            "marker_checks_per_shard": headline(
                round(per_shard, 3), unit="checks/shard", target="<= 3",
                note=f"{big['marker_checks']} marker reads for {args.large} shards x 3 input stages, plus "
                     f"{big['listings']} listings (one per stage folder)"),
        },
        details={"counts": counts, "seconds_small": paired.a_seconds, "seconds_large": paired.b_seconds},
    )


if __name__ == "__main__":
    main()
