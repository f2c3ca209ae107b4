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
PAPER_IDENTITIES = 3_800_000
RAY_RESULT = ROOT / "benchmarks" / "results" / "clean_scale_ray.json"  # names: at most one identity each before merging


def shard_table(k: int, n: int, per_name: int, dim: int, repeat_share: float = 0.05) -> pa.Table:
    """Shard `k` of the generated faces: `n` rows, whole names of `per_name` rows each (name-aligned, as the
    query writes them), 30 % of a name's rows other people, and `repeat_share` of the names holding one
    photo twice (a second detection in the name's first photo, close to the person: one detection per
    photo must drop one). Seeded by the shard index, so the first shards of a big set are a small set."""
    rng = np.random.default_rng(1000 + k)
    start = k * SHARD
    idx = np.arange(start, start + n)
    name = idx // per_name
    first = int(name[0])
    persons = normalise(rng.standard_normal((int(name[-1]) - first + 1, dim)).astype(np.float32))
    base = persons[name - first]
    feats = normalise(base + 0.75 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim))
    noisy = rng.random(n) < 0.3
    noisy[idx % per_name < 2] = False  # the rows a repeated photo uses are the person
    feats[noisy] = normalise(rng.standard_normal((int(noisy.sum()), dim)).astype(np.float32))
    raw = (feats * 20).astype("<f2")
    sample = [f"s{i:09d}" for i in idx]
    det = np.zeros(n, np.int32)
    names_here = np.unique(name)
    repeat = names_here[rng.random(len(names_here)) < repeat_share]
    for m in repeat:  # row 1 of the name is a second face in the photo of row 0
        r = int(m * per_name - start + 1)
        sample[r], det[r] = sample[r - 1], 1
    pid = [f"{smp}_{d}" for smp, d in zip(sample, det.tolist())]
    cols = {
        "person_id": pa.array(pid), "sample_id": pa.array(sample),
        "detection_index": pa.array(det),
        "source_label": pa.array([f"n{m:07d}" for m in name]), "name": pa.array([f"n{m:07d}" for m in name]),
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
    """`rows` rows over `names` names (rows / names each, dividing the shard size), streamed shard by shard."""
    per_name = max(1, rows // names)
    if SHARD % per_name:
        raise SystemExit(f"rows per name ({per_name}) must divide the shard size {SHARD}")
    write_faces_dir(root, (shard_table(k, min(SHARD, rows - s), per_name, dim)
                           for k, s in enumerate(range(0, rows, SHARD))))


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
    """t(2N) / t(N) of the step, paired, on the process CPU clock (headline) and on the wall clock.

    The step is single-threaded numpy, so its CPU time is its work; on this shared 2-core machine the wall
    clock also counts the time other processes hold the cores (the last wall figure, 2.53, was taken at
    load 24). Both are recorded."""
    small, big = photo_state(rows, dim), photo_state(2 * rows, dim, seed=1)

    def run(st: CleanState):
        def go() -> int:
            st.ident[:] = st.label
            st.reason[:] = None
            return _one_detection_per_photo(st)
        return go

    dropped = (run(small)(), run(big)())
    note = f"t({2 * rows} rows) / t({rows} rows), {dim}-d float16, 5% of identities with a repeated photo"
    cpu = paired_ratio(run(small), run(big), pairs=pairs, clock="cpu")
    wall = paired_ratio(run(small), run(big), pairs=pairs, clock="wall")
    # paired_ratio's ratio is rate(a) / rate(b) with unit work: t(big) / t(small).
    growth = cpu.summary(unit="x", target="<= 2.2", note=note + "; process CPU clock")
    return growth, {"rows": rows, "dim": dim, "dropped_same_photo": dropped, "cpu_seconds_small": cpu.a_seconds,
                    "cpu_seconds_big": cpu.b_seconds,
                    "wall": wall.summary(unit="x", target="<= 2.2", note=note + "; wall clock")}


def run_child(faces: Path, out: Path, block: int | None = None) -> None:
    """Run the stage in this (child) process; print its stats as JSON on the last line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from pipeline import clean
    from pipeline.config import BuildConfig

    cfg = BuildConfig()
    if block:
        cfg.clean.block_size = block
    t0 = time.perf_counter()
    stats = clean.run_single_process(cfg, {"faces": faces}, out)
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


def _child_generate(root: Path, rows: int, names: int, dim: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate", str(root), str(rows), str(names), str(dim)], check=True)
    return time.perf_counter() - t0


def _pass_seconds(d) -> list[float]:
    return [float(d.shard_stats(s)["seconds"]) for s in d.done_ids()]


def _search_work(clean_dir: Path) -> dict:
    """Pairs computed and unit seconds of every merge-search round (from the passes' own files)."""
    from pipeline.shards import DatasetDir

    names = DatasetDir(clean_dir / "_names")
    blocks = names.read_json("blocks.json")["blocks"]
    size = [sum(int(names.shard_stats(s).get("identities", 0)) for s in b) for b in blocks]
    r0 = DatasetDir(clean_dir / "_merge" / "r0")
    secs = sum(_pass_seconds(r0))
    # Units are the tiles (a, b >= a); a tile is |a| x |b| products, a diagonal one |a|^2 / 2.
    tiles = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks))]
    pairs = float(sum(size[a] * size[b] if a != b else size[a] * (size[a] - 1) / 2 for a, b in tiles))
    rounds = sorted(p.name for p in (clean_dir / "_merge").iterdir() if p.name.startswith(("r", "g")))
    later = sum(sum(_pass_seconds(DatasetDir(clean_dir / "_merge" / r))) for r in rounds if r != "r0")
    found = sum(DatasetDir(clean_dir / "_merge" / "r0").shard_stats(s)["rows_out"] for s in r0.done_ids())
    # The units' own clocks (pipeline/clean/cross.py): CPU seconds do not count the time other jobs on the
    # shared machine held the cores, so pairs per CPU second is the per-core rate; wall seconds include it.
    unit = [r0.shard_stats(s) for s in r0.done_ids()]
    cpu = sum(float(u.get("unit_cpu_seconds", u.get("unit_cpu_s", 0))) for u in unit)
    products = sum(int(u.get("products", 0)) for u in unit)
    return {"blocks": len(blocks), "block_identities": size, "tiles": len(tiles), "pairs_computed": pairs,
            "round0_unit_seconds_sum": round(secs, 2), "round0_unit_cpu_seconds_sum": round(cpu, 2),
            "products_counted_by_units": products,
            "pairs_per_s_per_core": round(pairs / max(cpu, 1e-9)) if cpu else round(pairs / max(secs, 1e-9)),
            "pairs_per_wall_s_per_unit": round(pairs / max(secs, 1e-9)),
            "rate_basis": "unit CPU seconds" if cpu else "unit wall seconds",
            "later_rounds": [r for r in rounds if r != "r0"], "later_rounds_unit_seconds_sum": round(later, 2),
            "pairs_found_round0": int(found)}


def cluster_main(args: argparse.Namespace) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline import clean
    from pipeline.config import BuildConfig
    from pipeline.executors import make_executor
    from pipeline.runtime import init_ray
    from pipeline.shards import DatasetDir

    rec = Recorder("clean_scale_ray", args)
    store = 300 * 2**20
    with tempfile.TemporaryDirectory(prefix="clean-scale-ray-") as tmp:
        tmp = Path(tmp)
        # Data generation runs in child processes: the driver's RSS is the stage's, not the generator's.
        gen_s = _child_generate(tmp / "faces", args.rows, args.names, args.dim)
        subset_rows = min(args.subset, args.rows)
        if 0 < subset_rows < args.rows:  # the first shards of the same data (name-aligned, same seeds)
            _child_generate(tmp / "faces_subset", subset_rows, max(1, args.names * subset_rows // args.rows),
                            args.dim)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": store})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        cfg = BuildConfig()
        cfg.clean.block_size = args.block
        try:
            init_ray(cluster.address)
            ex = make_executor("ray", task_cpus=1.0)
            with RssSampler() as rss:
                t0 = time.perf_counter()
                stats = clean.run(cfg, {"faces": tmp / "faces"}, tmp / "clean", executor=ex)
                wall = time.perf_counter() - t0
            if 0 < subset_rows < args.rows:
                clean.run(cfg, {"faces": tmp / "faces_subset"}, tmp / "sub_ray", executor=ex)
        finally:
            ray.shutdown()
            cluster.shutdown()
        single_s = single_peak = None
        identical_note = f"Ray vs single process, {subset_rows} rows"
        source = {"started": rec.env()["started"], "rows": subset_rows}
        if subset_rows:
            sub_faces = tmp / ("faces_subset" if subset_rows < args.rows else "faces")
            sub_ray = tmp / ("sub_ray" if subset_rows < args.rows else "clean")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", str(sub_faces), str(tmp / "sub_single"),
                            "--block", str(args.block)], capture_output=True, text=True, check=True)
            single_s = round(time.perf_counter() - t0, 1)
            single_peak = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
            a, b = DatasetDir(sub_ray), DatasetDir(tmp / "sub_single")
            identical = a.done_ids() == b.done_ids() and all(
                a.parquet(s).read_bytes() == b.parquet(s).read_bytes() for s in a.done_ids())
        else:  # --subset 0: not compared in this run; the figure of the last run that compared, marked
            prev = json.loads(RAY_RESULT.read_text()) if RAY_RESULT.exists() else {}
            identical = prev.get("identical")
            # The run that compared (a carried figure names its source, so a chain of --subset 0 runs
            # still points at the comparing run).
            source = prev.get("details", {}).get("identical_source") or {
                "started": prev.get("env", {}).get("started"), "rows": prev.get("details", {}).get("subset_rows")}
            identical_note = (f"NOT re-checked in this run (--subset 0): carried from the run of "
                              f"{source['started']} (Ray vs single process, {source['rows']} rows)")
        passes = {name: _pass_seconds(DatasetDir(tmp / "clean" / sub)) for name, sub in
                  (("names", "_names"), ("dedup", "_dedup"), ("select", "."))}
        search = _search_work(tmp / "clean")
        merge_report = stats["steps"]["merge"]
    per_unit = {k: float(np.median(v)) for k, v in passes.items()}
    nodes, cpus = 16, 32  # the named cluster of the projection
    cores = nodes * cpus
    paper_shards = PAPER_ROWS / SHARD
    search_h = PAPER_IDENTITIES ** 2 / 2 / search["pairs_per_s_per_core"] / cores / 3600
    projection = {
        "cluster": f"{nodes} nodes x {cpus} CPUs, one unit per CPU", "rows": PAPER_ROWS,
        "shards": int(paper_shards), "identities": PAPER_IDENTITIES,
        **{f"{k}_pass_h": round(paper_shards * v / cores / 3600, 3) for k, v in per_unit.items()},
        "merge_search_h": round(search_h, 3),
        "merge_search_tiles_at_block": int((PAPER_IDENTITIES / args.block) ** 2 / 2),
        "note": f"unit seconds and the search rate ({search['pairs_per_s_per_core']:.3g} centre pairs/s per "
                f"core, round 0 tiles) measured here at load ~{loadavg_now()} on 2 shared cores; the search is "
                "identities^2 / 2 exact products (recall 1 by construction); later merge rounds search only "
                "the merged identities (measured: see later_rounds_unit_seconds_sum)",
    }
    # The 5 M rows / 500 k names on this same 2-worker cluster, from this run: generation and the
    # per-name passes grow with rows, the round-0 search with identities squared (its units' seconds over
    # the 2 workers); the rest of the wall (per-name passes, later rounds, driver) with rows.
    k = 5_000_000 / args.rows
    search_wall = search["round0_unit_seconds_sum"] / 2
    here = {"rows": 5_000_000, "names": 500_000, "generate_s": round(gen_s * k),
            "stage_without_search_s": round(max(0.0, wall - search_wall) * k),
            "search_s": round(search_wall * (500_000 / args.names) ** 2)}
    here["total_s"] = sum(v for key, v in here.items() if key.endswith("_s"))
    here["note"] = (f"scaled from this run ({args.rows} rows / {args.names} names, load ~{loadavg_now()}): "
                    "generation and the stage without the search x rows, the round-0 search (unit seconds / 2 "
                    "workers) x identities^2")
    details = {"rows": args.rows, "names": args.names, "dim": args.dim, "block": args.block,
               "generate_s": round(gen_s, 1), "wall_s": round(wall, 1),
               "unit_seconds_median": {k: round(v, 3) for k, v in per_unit.items()},
               "unit_seconds_max": {k: round(max(v), 3) for k, v in passes.items() if v},
               "units": {k: len(v) for k, v in passes.items()}, "search": search, "merge": merge_report,
               "subset_rows": subset_rows, "identical_source": source, "single_process_s": single_s,
               "single_process_peak_gib": single_peak,
               "identities": stats["identities"], "images": stats["images"],
               "same_photo_dropped": stats["drops"].get("same_photo", 0), "drops": stats["drops"],
               "projection_94m": projection, "projection_5m_this_cluster": here}
    rec.write({"worker_peak_gib": headline(round(rss.worker_peak / 2**30, 3), unit="GiB", target="< 1.5",
                                           note=f"largest ray:: process, {args.rows} rows / {args.names} names"),
               "driver_peak_gib": headline(round(rss.driver_peak / 2**30, 3), unit="GiB", target="< 1",
                                           note="this process during the run (plans, found pairs, merge map)"),
               "identical": headline(identical, note=identical_note)},
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
    ap.add_argument("--block", type=int, default=65_536, help="identities per block of the merge search")
    ap.add_argument("--generate", nargs=4, metavar=("ROOT", "ROWS", "NAMES", "DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), *(int(x) for x in args.generate[1:]))
        return
    if args.cluster:
        cluster_main(args)
        return
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]), args.block)
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
