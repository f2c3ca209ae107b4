"""Clean-stage scale: wall time and peak memory of the whole stage on N synthetic features over M names,
and how the one-detection-per-photo step grows when rows double.

The faces shards are generated first (10 000 rows each, 512-d float16 features, ~10 photos per name, 30%
label noise); then the stage runs in a child process whose peak RSS is measured on its own. Per-step times
come from the stage's log. A projection to the paper's 94 M images is printed from the measured rates:
loading and DBSCAN scale with rows, the merge search with identities squared.

Same-photo growth: `_one_detection_per_photo` on an in-memory state of N and 2N rows (512-d float16, ten
rows per identity, 5 % of identities holding a repeated photo), timed in pairs (benchmarks/paired.py):
the ratio t(2N) / t(N) must stay <= 2.2 (the old step scanned all N rows once per such identity: 4x).

Partitioned on Ray (`--cluster`): the stage (pipeline/clean/partition.py) on a 3-node
`ray.cluster_utils.Cluster` (head num_cpus=0, two 1-CPU workers, 300 MB object stores). Worker RSS (every
`ray::` process) and the driver's RSS are sampled every 0.2 s during the run; the verdicts of the first
`--subset` rows' shards are compared byte for byte with the single-process reference; the 94 M projection
uses the measured seconds per names-pass unit and the merge search rate (center pairs per second).

Usage: python benchmarks/clean_scale.py [--rows 200000] [--names 20000] [--dim 512] [--photo-rows 500000]
       python benchmarks/clean_scale.py --cluster [--rows 100000] [--names 10000] [--subset 20000]
Writes benchmarks/results/clean_scale.json (single process) or clean_scale_ray.json (--cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from benchmarks.paired import Recorder, headline, paired_ratio  # noqa: E402
from pipeline.clean.cluster import _one_detection_per_photo  # noqa: E402
from pipeline.clean.state import CleanState, normalise  # noqa: E402
from pipeline.clean.synthetic import write_faces_dir  # noqa: E402
from schemas.faces import FACES  # noqa: E402

SHARD = 10_000
PAPER_ROWS = 94_000_000  # images entering the pipeline in the paper; clean sees at most this many faces
PAPER_IDENTITIES = 3_800_000  # names: at most one identity each before merging


def shard_table(rng: np.random.Generator, start: int, n: int, names: int, persons: np.ndarray) -> pa.Table:
    idx = np.arange(start, start + n)
    name = idx % names
    noisy = rng.random(n) < 0.3
    dim = persons.shape[1]
    base = persons[name % len(persons)]
    feats = normalise(base + 0.75 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim))
    feats[noisy] = normalise(rng.standard_normal((int(noisy.sum()), dim)).astype(np.float32))
    raw = (feats * 20).astype("<f2")
    pid = [f"s{i:09d}_0" for i in idx]
    cols = {
        "person_id": pa.array(pid), "sample_id": pa.array([p[:-2] for p in pid]),
        "detection_index": pa.array(np.zeros(n, np.int32)),
        "label": pa.array([f"n{k:07d}" for k in name]), "name": pa.array([f"n{k:07d}" for k in name]),
        "face_box": pa.array([[10.0, 10.0, 60.0, 60.0]] * n, FACES.schema.field("face_box").type),
        "face_landmarks": pa.array([[1.0] * 10] * n, FACES.schema.field("face_landmarks").type),
        "face_score": pa.array(rng.uniform(0.94, 1.0, n).astype(np.float32)),
        "face_size_px": pa.array(np.full(n, 50.0, np.float32)),
        "feature": pa.array([r.tobytes() for r in raw], pa.binary()),
        "feature_dim": pa.array(np.full(n, dim, np.int32)),
        "feature_norm": pa.array(np.linalg.norm(raw.astype(np.float32), axis=1)),
        "embedder": pa.array(["kprpe"] * n),
    }
    return FACES.validate(pa.table(cols))


def generate(root: Path, rows: int, names: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    persons = normalise(rng.standard_normal((names, dim)).astype(np.float32))
    tables = [shard_table(rng, s, min(SHARD, rows - s), names, persons) for s in range(0, rows, SHARD)]
    write_faces_dir(root, tables)


def photo_state(rows: int, dim: int, seed: int = 0) -> CleanState:
    """Ten rows per identity; 5 % of identities hold one photo twice (two detections)."""
    rng = np.random.default_rng(seed)
    ident = np.arange(rows) // 10
    photo = np.arange(rows)
    n_ids = int(ident.max()) + 1
    rep = rng.choice(n_ids, size=max(1, n_ids // 20), replace=False)
    photo[rep * 10 + 1] = photo[rep * 10]  # the identity's second row is a second face of its first photo
    feats = np.empty((rows, dim), dtype=np.float16)
    for a in range(0, rows, 100_000):
        feats[a:a + 100_000] = normalise(rng.standard_normal((min(100_000, rows - a), dim)).astype(np.float32))
    return CleanState(feats=feats, norms=np.ones(rows, np.float32), label=ident.copy(), labels=[],
                      photo=photo, face_score=rng.uniform(0.96, 1, rows).astype(np.float32),
                      order_key=np.arange(rows), ident=ident.copy())


def same_photo_growth(rows: int, dim: int, pairs: int) -> tuple[dict, dict]:
    small, big = photo_state(rows, dim), photo_state(2 * rows, dim, seed=1)

    def run(st: CleanState):
        def go() -> int:
            st.ident[:] = st.label
            st.reason[:] = None
            return _one_detection_per_photo(st)
        return go

    dropped = (run(small)(), run(big)())
    p = paired_ratio(run(small), run(big), pairs=pairs)
    # paired_ratio's ratio is rate(a) / rate(b) with unit work: t(big) / t(small).
    growth = p.summary(unit="x", target="<= 2.2", note=f"t({2 * rows} rows) / t({rows} rows), "
                       f"{dim}-d float16, 5% of identities with a repeated photo")
    return growth, {"rows": rows, "dim": dim, "dropped_same_photo": dropped, "seconds_small": p.a_seconds,
                    "seconds_big": p.b_seconds}


def run_child(faces: Path, out: Path) -> None:
    """Run the stage in this (child) process; print its stats as JSON on the last line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from pipeline import clean
    from pipeline.config import BuildConfig

    t0 = time.perf_counter()
    stats = clean.run_single_process(BuildConfig(), {"faces": faces}, out)
    stats["wall_s"] = time.perf_counter() - t0
    print(json.dumps(stats))


class RssSampler:
    """Peak RSS of this run's `ray::` worker processes (the largest one) and of this process, sampled."""

    def __init__(self, period: float = 0.2):
        import threading

        import psutil

        self.psutil, self.period = psutil, period
        self.worker_peak = self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            # Only this run's cluster: its nodes are children of this process (other users' Ray is not).
            for p in me.children(recursive=True):
                try:
                    if p.name().startswith("ray::") or p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        self.worker_peak = max(self.worker_peak, p.memory_info().rss)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, IndexError):
                    continue
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cluster_main(args: argparse.Namespace) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline import clean
    from pipeline.clean.merge import merge_centers
    from pipeline.clean.partition import gather_centers
    from pipeline.clean.select import resolve_thresholds
    from pipeline.config import BuildConfig
    from pipeline.executors import make_executor
    from pipeline.runtime import init_ray
    from pipeline.shards import DatasetDir

    rec = Recorder("clean_scale_ray", args)
    store = 300 * 2**20
    with tempfile.TemporaryDirectory(prefix="clean-scale-ray-") as tmp:
        tmp = Path(tmp)
        generate(tmp / "faces", args.rows, args.names, args.dim)
        subset_rows = min(args.subset, args.rows)
        # The subset: its own faces directory (whole shards, the same generator: names stay aligned).
        generate(tmp / "faces_subset", subset_rows, max(1, args.names * subset_rows // args.rows), args.dim)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": store})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        try:
            init_ray(cluster.address)
            cfg = BuildConfig()
            ex = make_executor("ray", task_cpus=1.0)
            with RssSampler() as rss:
                t0 = time.perf_counter()
                stats = clean.run(cfg, {"faces": tmp / "faces"}, tmp / "clean", executor=ex)
                wall = time.perf_counter() - t0
            clean.run(cfg, {"faces": tmp / "faces_subset"}, tmp / "sub_ray", executor=ex)
        finally:
            ray.shutdown()
            cluster.shutdown()
        clean.run_single_process(cfg, {"faces": tmp / "faces_subset"}, tmp / "sub_single")
        a, b = DatasetDir(tmp / "sub_ray"), DatasetDir(tmp / "sub_single")
        identical = a.done_ids() == b.done_ids() and all(
            a.parquet(s).read_bytes() == b.parquet(s).read_bytes() for s in a.done_ids())
        names_dir = DatasetDir(tmp / "clean" / "_names")
        unit_s = [names_dir.shard_stats(s)["seconds"] for s in names_dir.done_ids()]
        idents, sums, counts = gather_centers(names_dir)
        t0 = time.perf_counter()
        thr = resolve_thresholds(cfg.clean, "kprpe")
        merge_centers(idents, sums, counts, thr.merge, thr.ambiguous, cfg.clean.block_size)
        merge_s = time.perf_counter() - t0
    shards = len(unit_s)
    per_unit = float(np.median(unit_s))
    pair_rate = len(idents) ** 2 / 2 / max(merge_s, 1e-9)
    nodes, cpus = 16, 32  # the named cluster of the projection
    paper_shards = PAPER_ROWS / SHARD
    projection = {
        "cluster": f"{nodes} nodes x {cpus} CPUs, one unit per CPU",
        "rows": PAPER_ROWS, "shards": int(paper_shards),
        "names_pass_h": round(paper_shards * per_unit / (nodes * cpus) / 3600, 2),
        "merge_search_h_one_process": round(PAPER_IDENTITIES ** 2 / 2 / pair_rate / 3600, 2),
        "note": f"per-unit seconds measured at load ~{loadavg_now()} on 2 shared cores; merge search is "
                "identities^2 (one round); the dedup and select passes cost about as much as the names pass "
                "or less",
    }
    details = {"rows": args.rows, "names": args.names, "dim": args.dim, "shards": shards, "wall_s": round(wall, 1),
               "unit_seconds_median": round(per_unit, 3), "unit_seconds_max": round(max(unit_s), 3),
               "identities_centers": len(idents), "merge_search_s": round(merge_s, 3),
               "merge_pairs_per_s": round(pair_rate), "subset_rows": subset_rows,
               "identities": stats["identities"], "images": stats["images"], "projection_94m": projection}
    rec.write({"worker_peak_gib": headline(round(rss.worker_peak / 2**30, 3), unit="GiB",
                                           note=f"largest ray:: process, {args.rows} rows, {shards} units"),
               "driver_peak_gib": headline(round(rss.driver_peak / 2**30, 3), unit="GiB",
                                           note="this process during the run (plans, centers, merge)"),
               "identical": headline(bool(identical), note=f"Ray vs single process, {subset_rows} rows")},
              details)
    print(json.dumps(details))


def loadavg_now() -> str:
    return " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--names", type=int, default=20_000)
    ap.add_argument("--photo-rows", type=int, default=500_000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", nargs=2, metavar=("FACES", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--cluster", action="store_true", help="the partitioned stage on a 3-node Ray cluster")
    ap.add_argument("--subset", type=int, default=20_000)
    args = ap.parse_args()
    if args.cluster:
        cluster_main(args)
        return
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]))
        return
    rec = Recorder("clean_scale", args)
    growth, growth_details = same_photo_growth(args.photo_rows, args.dim, args.pairs)
    with tempfile.TemporaryDirectory(prefix="clean-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate(tmp / "faces", args.rows, args.names, args.dim)
        gen_s = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, __file__, "--child", str(tmp / "faces"), str(tmp / "clean")],
                              capture_output=True, text=True, check=True)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        log = proc.stderr
    feature_gib = args.rows * args.dim * 2 / 2**30
    wall = stats["wall_s"]
    # Projection: linear parts scale with rows; the merge search (identities^2) is timed apart in the log.
    per_row = wall / args.rows
    result = {
        "rows": args.rows, "names": args.names, "dim": args.dim, "generate_s": round(gen_s, 1),
        "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2), "feature_gib": round(feature_gib, 2),
        "identities": stats["identities"], "images": stats["images"], "funnel": stats["funnel"],
        "us_per_row": round(per_row * 1e6, 1),
        "projection_94m": {
            "rows": PAPER_ROWS,
            "linear_part_h": round(per_row * PAPER_ROWS / 3600, 2),
            "feature_memory_gib": round(PAPER_ROWS * args.dim * 2 / 2**30, 1),
            "peak_rss_gib_if_linear": round(peak_gib * PAPER_ROWS / args.rows, 1),
        },
        "log_tail": log.splitlines()[-12:],
    }
    rec.write({"same_photo_growth_x": growth,
               "stage_peak_gib": headline(round(peak_gib, 3), unit="GiB",
                                          note=f"whole stage, ONE process, {args.rows} rows / {args.names} names")},
              {"stage": result, "same_photo": growth_details})
    print(json.dumps(result["projection_94m"]))


if __name__ == "__main__":
    main()
