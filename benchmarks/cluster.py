"""Driver memory of a model stage on a 3-node Ray cluster, and byte-identity with the local executor.

A `ray.cluster_utils.Cluster` on this machine: a head with `num_cpus=0` (it only schedules) and two worker
nodes with 300 MB object stores. The stage is a stand-in of the real `ShardStage` model kind
(`uses_model = True`, so it runs in the RayExecutor's actor pool exactly as persons/faces do): `setup()`
builds a fixed random projection (the "model"), `process()` turns each row's image bytes into a sha256
digest and a 16-d float feature. Each input shard holds ~`--shard-mb` MB of incompressible bytes, so
200 shards are far more than all object stores together: a driver that materialised shards (as the old
`from_arrow_refs` path did) would grow with the input.

Measured, with the driver's RSS sampled every 50 ms during `RayExecutor.run` (fresh output each run):
- `driver_rss_mb_200`: peak driver RSS over the 200-shard stage (target < 400);
- `driver_rss_ratio_200_vs_50`: paired ratio of peak RSS, 200 shards over 50 (target <= 1.2): the two
  runs interleaved in alternating order, `--pairs` pairs, median with min and max;
- `identical`: every output parquet of the 200-shard run byte-identical to the LocalExecutor's;
- `identical_after_node_kill`: a 50-shard run during which a worker node hosting an actor is removed
  without grace (no node replaces it), then compared with the local run byte for byte.

    python benchmarks/cluster.py [--small 50 --large 200 --shard-mb 20 --pairs 5]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.paired import Recorder, headline, paired_ratio  # noqa: E402
from pipeline.executors import LocalExecutor, RayExecutor  # noqa: E402
from pipeline.shards import DatasetDir, format_shard_id  # noqa: E402
from pipeline.stage import BatchResult, ShardStage  # noqa: E402
from schemas.base import TableSchema  # noqa: E402

IMAGES = TableSchema("bench_images", 1, pa.schema([pa.field("sample_id", pa.string(), False),
                                                   pa.field("image", pa.binary())]))
FEATURES = TableSchema("bench_features", 1, pa.schema([pa.field("sample_id", pa.string(), False),
                                                       pa.field("digest", pa.string()),
                                                       pa.field("feature", pa.list_(pa.float32()))]))


class StandInModel(ShardStage):
    """A cheap model stage of the real kind: one 'model load' per actor, pure per-batch compute."""

    name = "standin_model"
    input_schema = IMAGES
    output_schema = FEATURES
    uses_model = True

    def __init__(self, batch_size: int = 16):
        super().__init__({"batch_size": batch_size})
        self.projection: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return int(self.config["batch_size"])

    def setup(self) -> None:
        self.projection = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)

    def process(self, batch: pa.Table) -> BatchResult:
        assert self.projection is not None
        rows, drops = [], Counter()
        for sid, img in zip(batch.column("sample_id").to_pylist(), batch.column("image").to_pylist(), strict=True):
            if not img:
                drops["empty"] += 1
                continue
            head = np.frombuffer(img[:256].ljust(256, b"\0"), dtype=np.uint8).astype(np.float32) / 255.0
            rows.append({"sample_id": sid, "digest": hashlib.sha256(img).hexdigest(),
                         "feature": (head @ self.projection).round(4).tolist()})
        return BatchResult(FEATURES.from_rows(rows), drops)


def make_input(root: Path, n_shards: int, shard_mb: float, rows: int) -> DatasetDir:
    d = DatasetDir(root)
    per_row = int(shard_mb * 2**20 / rows)
    rng = np.random.default_rng(1)
    for s in range(n_shards):
        sid = format_shard_id(s)
        if d.is_done(sid):
            continue
        blobs = [rng.bytes(per_row) for _ in range(rows)]
        t = IMAGES.from_rows([{"sample_id": f"{sid}-{i:04d}", "image": b} for i, b in enumerate(blobs)])
        d.commit_shard(sid, t, {"rows_in": rows, "rows_out": rows, "drops": {}})
    return d


def subset(src: Path, dst: Path, n: int) -> None:
    """The first n shards of src (hard links: no extra disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        sid = format_shard_id(s)
        for name in (f"part-{sid}.parquet", f"part-{sid}.stats.json", f"part-{sid}.done"):
            if not (dst / name).exists():
                (dst / name).hardlink_to(src / name)


class PeakRss:
    """Samples this process's RSS every `interval` seconds while active."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakRss:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def start_cluster(store: int, attempts: int = 3) -> tuple:
    """Head (num_cpus=0) + 2 workers. Ray gives a node 30 s to register; on this shared box under heavy load
    that is sometimes too little, so a failed start is retried."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                    "object_store_memory": store})
            workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
            cluster.wait_for_nodes()
            return cluster, workers
        except Exception as exc:  # noqa: BLE001 (a node that did not start in time: retry)
            print(f"cluster start failed ({exc}); attempt {attempt + 2} of {attempts}", flush=True)
            if cluster is not None:
                cluster.shutdown()
            time.sleep(10)
    raise RuntimeError("could not start the 3-node cluster")


def parquet_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("part-*.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--large", type=int, default=200)
    ap.add_argument("--shard-mb", type=float, default=20.0)
    ap.add_argument("--rows", type=int, default=64, help="rows per shard")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--object-store-mb", type=int, default=300)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    rec = Recorder("cluster", args)
    work = args.work or Path(tempfile.mkdtemp(prefix="webbody-cluster-"))
    try:
        run(args, rec, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, rec: Recorder, work: Path) -> None:
    import ray

    t0 = time.perf_counter()
    make_input(work / "large", args.large, args.shard_mb, args.rows)
    subset(work / "large", work / "small", args.small)
    input_seconds = time.perf_counter() - t0
    LocalExecutor().run(StandInModel(), work / "large", work / "local")
    reference = parquet_bytes(work / "local")

    store = args.object_store_mb * 2**20
    cluster, workers = start_cluster(store)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    ex = RayExecutor(num_actors=2, actor_cpus=1.0, address=cluster.address)
    peaks: dict[str, list[float]] = {"small": [], "large": []}
    counter = iter(range(10_000))

    def one(kind: str) -> float:
        out = work / f"out-{kind}-{next(counter)}"
        with PeakRss() as rss:
            ex.run(StandInModel(), work / kind, out)
        peaks[kind].append(rss.mb)
        if kind == "large" and "identical" not in details:
            details["identical"] = parquet_bytes(out) == reference
        shutil.rmtree(out, ignore_errors=True)
        return rss.mb

    details: dict = {"input_build_seconds": round(input_seconds, 1)}
    # paired_ratio times its callables; the figure here is memory, so each side returns its peak and the
    # ratio is formed from those (A = 200 shards, B = 50 shards, interleaved in alternating order).
    paired = paired_ratio(lambda: one("large"), lambda: one("small"), pairs=args.pairs, warmup=False)
    ratios = [a / b for a, b in zip(peaks["large"], peaks["small"], strict=True)]
    med_ratio = float(np.median(ratios))
    details.update({"peak_rss_mb_small": [round(x, 1) for x in peaks["small"]],
                    "peak_rss_mb_large": [round(x, 1) for x in peaks["large"]],
                    "ratios": [round(x, 4) for x in ratios], "order": paired.order,
                    "stage_seconds_large": [round(x, 1) for x in paired.a_seconds],
                    "stage_seconds_small": [round(x, 1) for x in paired.b_seconds],
                    "loadavg_per_pair": paired.load})

    def headlines(identical_after_kill: bool | None, note: str) -> dict:
        large_peak = max(peaks["large"])
        return {
            "driver_rss_mb_200": headline(large_peak, min(peaks["large"]), max(peaks["large"]), pairs=args.pairs,
                                          unit="MB", target="< 400",
                                          note=f"peak over {args.large} shards of {args.shard_mb} MB (max of runs)"),
            "driver_rss_ratio_200_vs_50": headline(med_ratio, min(ratios), max(ratios), pairs=args.pairs,
                                                   unit="x", target="<= 1.2",
                                                   note=f"{args.large} vs {args.small} shards, paired"),
            "identical": headline(bool(details["identical"]), unit="", target="== true",
                                  note="200-shard Ray run vs LocalExecutor, parquet bytes"),
            "identical_after_node_kill": headline(identical_after_kill, unit="", target="== true", note=note),
        }

    rec.write(headlines(None, "not measured yet (written before the kill run)"), details)

    # A worker node hosting an actor removed without grace mid-stage, a fresh one added: same bytes.
    kill_out = work / "out-kill"
    killed: dict = {}

    def killer() -> None:
        d = DatasetDir(kill_out)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if len(d.refresh().done_ids()) >= 2:
                break
            time.sleep(0.05)
        killed["done_before"] = len(d.refresh().done_ids())
        # (No replacement node: Cluster.add_node must run on the main thread. The lost actor's replacement
        # cannot be placed, so the surviving actor runs the lost shard and the rest.)
        cluster.remove_node(workers[0], allow_graceful=False)
        killed["at"] = time.monotonic()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = ex.run(StandInModel(), work / "small", kill_out)
    thread.join(timeout=60)
    small_ref = {k: v for k, v in reference.items() if int(k[5:-8]) < args.small}
    identical_after_kill = bool(killed) and parquet_bytes(kill_out) == small_ref
    details.update({
        "kill": {"shards_done_before_kill": killed.get("done_before"), "resubmitted": summary.resubmitted,
                 "shards": args.small},
        "shard_mb": args.shard_mb, "rows_per_shard": args.rows, "object_store_mb_per_node": args.object_store_mb,
        "input_gb_large": round(args.large * args.shard_mb / 1024, 2),
        "stage": "StandInModel: a ShardStage with uses_model=True (actor pool), sha256 + 16-d projection per row",
        "cluster": "ray.cluster_utils.Cluster: head num_cpus=0, 2 workers x 1 CPU, object stores as above",
    })
    ray.shutdown()
    cluster.shutdown()
    rec.write(headlines(identical_after_kill,
                        f"worker node removed after {killed.get('done_before')} of {args.small} shards"), details)


if __name__ == "__main__":
    main()
