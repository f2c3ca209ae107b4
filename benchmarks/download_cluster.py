"""Download at cluster width: the download stage on a 3-node Ray cluster on this machine vs a single-node run.

    .venv/bin/python benchmarks/download_cluster.py [--images 2000] [--shard-size 40] [--timeout 2]

A `ray.cluster_utils.Cluster`: head with num_cpus=0, 3 worker nodes x 2 CPUs, 300 MB object stores. A
loopback HTTP server (its own process, so the driver's memory is the driver's) serves `--images` URLs of
64 distinct JPEGs (300-900 px): 5 % stall past the client timeout (`--timeout`, answered after timeout +
3 s), 5 % answer 503 then 200 (recovered by the stage's retry of transient failures), the rest 200.
img2dataset retries 0, the stage's retries on, 16 threads per task; the stage runs on the contract's Ray executor (one task per manifest
shard).

Measured (figures in benchmarks/results/download_cluster.json):
- tasks in flight: every 0.5 s, the worker processes of this cluster (children of its raylets) whose
  title says they run an executor task (`ray::_ray_execute`; idle workers read `ray::IDLE`), from the
  first sample at full width until fewer shards are left than slots (the tail); target: median == 6;
- first shard commit (first marker in the output, polled every 0.5 s) / stage wall time (target < 0.1);
- driver peak RSS, sampled every 0.2 s during the cluster run (target < 300 MB);
- a killed task is resubmitted: once the first shard has committed, one running task's worker process
  gets SIGKILL; the stage must run it again (`run.resubmitted` >= 1) and finish with every shard;
- per-row statuses (and the sha256 of every stored image) equal a single-node run's: the same URLs
  downloaded on one local Ray node with 2 CPUs, against a fresh server;
- what a fresh download worker imports before its first unit (`worker_imports`: seconds, and whether torch
  came in; it did through img2dataset's package __init__ until pipeline/download/i2d.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from benchmarks.download import Server  # noqa: E402
from benchmarks.paired import Recorder, headline  # noqa: E402


def kind_of(i: int) -> str:
    """5 % stall, 5 % 503-then-200, the rest plain (fixed by index, so every run serves the same)."""
    r = i % 20
    return "stall" if r == 7 else "flaky" if r == 13 else "ok"


# A Ray worker's process title while it runs one of the executor's tasks (it reads "ray::IDLE" between tasks).
TASK_TITLE = "ray::_ray_execute"


class TaskSampler(threading.Thread):
    """Every `period` s: how many download tasks run on this cluster's nodes (worker processes, children of
    its raylets, titled TASK_TITLE) and how many shards have committed (markers in the output folder)."""

    def __init__(self, out: Path, raylet_pids: set[int], period: float = 0.5):
        super().__init__(daemon=True)
        self.out, self.raylets, self.period = out, raylet_pids, period
        self.samples: list[tuple[float, int, int]] = []  # (seconds since t0, running tasks, committed shards)
        self.t0 = time.perf_counter()
        self.halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.halt.is_set():
            running = 0
            for p in psutil.process_iter(["ppid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith(TASK_TITLE) and p.info["ppid"] in self.raylets:
                    running += 1
            done = len(list(self.out.glob("part-*.done"))) if self.out.exists() else 0
            self.samples.append((time.perf_counter() - self.t0, running, done))
            time.sleep(self.period)

    def first_commit(self) -> float | None:
        return next((t for t, _, d in self.samples if d > 0), None)

    def steady(self, width: int, shards: int) -> dict:
        """Running tasks from the first sample at full width until fewer shards are left than slots."""
        start = next((i for i, (_, r, _) in enumerate(self.samples) if r >= width), None)
        if start is None:
            counts = [r for _, r, _ in self.samples]
            return {"samples": len(counts), "median": sorted(counts)[len(counts) // 2] if counts else None,
                    "max": max(counts, default=None), "note": "never reached full width"}
        window = [r for _, r, d in self.samples[start:] if d < shards - width]
        if not window:
            return {"samples": 0}
        ordered = sorted(window)
        return {"samples": len(window), "median": ordered[len(ordered) // 2], "min": ordered[0],
                "max": ordered[-1], "at_width": round(sum(r >= width for r in window) / len(window), 3)}


class RssSampler(threading.Thread):
    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            time.sleep(self.period)


class Killer(threading.Thread):
    """Once a first shard is committed, SIGKILL one running download task of this cluster (once)."""

    def __init__(self, out: Path, raylet_pids: set[int]):
        super().__init__(daemon=True)
        self.out, self.raylets = out, raylet_pids
        self.killed: dict | None = None
        self.halt = threading.Event()

    def _candidates(self):
        import psutil

        for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith(TASK_TITLE) and p.info["ppid"] in self.raylets:
                yield p

    def run(self) -> None:
        while not self.halt.is_set() and not list(self.out.glob("part-*.done")):
            time.sleep(0.2)
        time.sleep(1.0)
        while not self.halt.is_set() and self.killed is None:
            for p in self._candidates():
                self.killed = {"pid": p.pid, "title": TASK_TITLE, "at": time.time()}
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.2)


WORKER_IMPORTS = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.runtime import ensure_offline_env
ensure_offline_env()
import pipeline.executors, pipeline.download
from pipeline.download.i2d import module
module("downloader")
import pipeline.download.worker
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2),
                  "torch_imported": "torch" in sys.modules, "webdataset_imported": "webdataset" in sys.modules,
                  # bound but not loaded (pipeline/download/i2d.py): a loaded library has its submodules
                  "albumentations_loaded": "albumentations.core" in sys.modules,
                  "wandb_loaded": "wandb.sdk" in sys.modules}))
"""


def worker_imports() -> dict:
    """What a fresh download worker imports before its first unit (a child process, like a Ray worker)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", WORKER_IMPORTS], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raylet_pids(cluster) -> set[int]:
    pids = set()
    for node in cluster.list_all_nodes():
        for info in node.all_processes.get("raylet", []):
            pids.add(info.process.pid)
    return pids


def start_cluster(cluster_cls, attempts: int = 6):
    """Head (num_cpus=0) + 3 x 2-CPU workers. Ray gives a node 30 s to register (hard-coded); on this shared
    machine at load 15+ that sometimes fails, so the whole cluster start is tried again."""
    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = cluster_cls(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False, "object_store_memory": 300 * 2**20})
            for _ in range(3):
                cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20)
            cluster.wait_for_nodes()
            return cluster
        except Exception as exc:  # noqa: BLE001
            print(f"cluster start attempt {attempt} failed: {exc}", flush=True)
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts:
                raise
            time.sleep(10)
    raise AssertionError("unreachable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-kill", action="store_true")
    args = ap.parse_args()
    rec = Recorder("download_cluster", args)

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import BuildConfig, QueryConfig
    from pipeline.download import download
    from pipeline.query import build_manifest
    from pipeline.runtime import init_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="webbody-bench-dlcluster-"))
    work.mkdir(parents=True, exist_ok=True)
    dl = {"allow_private_hosts": ["127.0.0.1"], "timeout": int(args.timeout), "retries": 0,
          "retry_failed": True, "thread_count": args.threads, "task_timeout": 600}

    def manifest_for(base: str, name: str) -> Path:
        lst = work / f"{name}.lst"
        lst.write_text("".join(f"{i} id{i // 10} {base}/img/{i:06d}.jpg\n" for i in range(args.images)))
        build_manifest(QueryConfig(inputs=[{"path": str(lst)}], shard_size=args.shard_size), work / name)
        return work / name

    # -- the cluster run -----------------------------------------------------------------------------
    cluster = start_cluster(Cluster)
    try:
        with Server(args.images, kind_of, args.timeout) as base:
            manifest = manifest_for(base, "manifest")
            cfg = BuildConfig.model_validate({"run": {"executor": "ray", "ray_address": cluster.address},
                                              "download": dl})
            raylets = raylet_pids(cluster)
            rss = RssSampler()
            sampler = TaskSampler(work / "cluster", raylets)
            killer = Killer(work / "cluster", raylets)
            rss.start()
            sampler.start()
            if not args.no_kill:
                killer.start()
            t0 = time.perf_counter()
            sampler.t0 = t0
            stats = download(cfg, manifest, work / "cluster")
            cluster_wall = time.perf_counter() - t0
            for th in (rss, sampler, killer):
                th.halt.set()
            rss.join()
            sampler.join()
            print("cluster run:", json.dumps(stats["run"]), round(cluster_wall, 1), "s", flush=True)
        cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray.shutdown()
        cluster.shutdown()

    # -- the single-node run: one local Ray node with 2 CPUs, fresh server ---------------------------------
    init_ray(num_cpus=2)
    try:
        with Server(args.images, kind_of, args.timeout) as base2:
            # the same rows and URL paths; the server's port differs, so the manifest is rebuilt for it
            manifest2 = manifest_for(base2, "manifest2")
            cfg2 = BuildConfig.model_validate({"run": {"executor": "ray"}, "download": dl})
            t0 = time.perf_counter()
            single = download(cfg2, manifest2, work / "single")
            single_wall = time.perf_counter() - t0
            print("single-node run:", json.dumps(single["run"]), round(single_wall, 1), "s", flush=True)
    finally:
        ray.shutdown()

    # sample_id = sha1(label, url) and the URL's port differs between the runs: compare by URL path
    def by_path(d: Path) -> dict[str, tuple]:
        from pipeline.shards import DatasetDir

        out = {}
        for _, t in DatasetDir(d).iter_tables(columns=["url", "status", "image_sha256"]):
            for r in t.to_pylist():
                out[r["url"].split("/", 3)[3]] = (r["status"], r["image_sha256"])
        return out

    a, b = by_path(work / "cluster"), by_path(work / "single")
    mismatches = [k for k in a if a.get(k) != b.get(k)]
    identical = len(a) == len(b) == args.images and not mismatches

    from collections import Counter

    run = stats["run"]
    inflight = sampler.steady(cluster_cpus, stats["shards"])
    first = sampler.first_commit()
    first_frac = first / cluster_wall if first is not None else None
    headlines = {
        "tasks_in_flight_median": headline(inflight.get("median"), lo=inflight.get("min"), hi=inflight.get("max"),
                                           unit="tasks", target=f"== {cluster_cpus}",
                                           note=f"{inflight.get('samples')} samples of running tasks, at full "
                                                f"width {inflight.get('at_width')} of the time"),
        "first_commit_fraction": headline(round(first_frac, 4) if first_frac is not None else None,
                                          unit="of wall", target="< 0.1",
                                          note=f"first commit at {first and round(first, 1)} s of "
                                               f"{round(cluster_wall, 1)} s"),
        "driver_rss_mb": headline(round(rss.peak / 2**20, 1), unit="MB", target="< 300",
                                  note=f"peak of {rss.samples} samples"),
        "killed_task_resubmitted": headline(bool(killer.killed) and run["resubmitted"] >= 1 and stats["complete"],
                                            target="== true",
                                            note=f"killed pid {(killer.killed or {}).get('pid')}, "
                                                 f"resubmitted {run['resubmitted']}"),
        "statuses_equal_single_node": headline(identical, target="== true",
                                               note=f"{len(a)} rows, {len(mismatches)} differ (status and sha256)"),
    }
    details = {
        "images": args.images, "shard_size": args.shard_size, "shards": stats["shards"],
        "worker_imports": worker_imports(),
        "cluster": {"nodes": "head num_cpus=0 + 3 x 2 CPUs", "cpus": cluster_cpus, "object_store_mb": 300},
        "runs": {
            "cluster (3 x 2 CPUs)": {"wall_seconds": round(cluster_wall, 1), "first_commit_seconds": first,
                                     **{k: run.get(k) for k in ("units", "workers", "resubmitted", "timed_out")}},
            "single node (2 CPUs)": {"wall_seconds": round(single_wall, 1), "first_commit_seconds": None,
                                     **{k: single["run"].get(k) for k in ("units", "workers", "resubmitted",
                                                                          "timed_out")}},
        },
        "statuses": dict(Counter(s for s, _ in a.values())),
        "drops": stats["drops"], "notes": stats.get("notes"),
        "in_flight": inflight,
        "samples": [(round(t, 1), r, d) for t, r, d in sampler.samples],
        "mismatch_examples": [(k, a.get(k), b.get(k)) for k in mismatches[:10]],
    }
    rec.write(headlines, details)


if __name__ == "__main__":
    main()
