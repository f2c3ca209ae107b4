"""Download at cluster width: the download stage on a 3-node Ray cluster on this machine vs a single-node run.

    .venv/bin/python benchmarks/download_cluster.py [--images 4000] [--shard-size 40] [--timeout 2]

A `ray.cluster_utils.Cluster`: head with num_cpus=0, 3 worker nodes x 2 CPUs, 300 MB object stores. A
loopback HTTP server (its own process, so the driver's memory is the driver's) serves `--images` URLs of
64 distinct JPEGs (300-900 px): 5 % stall past the client timeout (`--timeout`, served after timeout + 3 s),
5 % answer 503 then 200 (recovered by the stage's retry pass), the rest 200. img2dataset retries 0, retry
pass on, 16 threads per task.

Measured (figures in benchmarks/results/download_cluster.json):
- tasks in flight: running tasks sampled every 0.5 s from the tasks' own start/end times, between the
  moment the first wave is all running and the last task's start (the tail after that drains); target:
  median == cluster CPUs (6);
- first shard commit time / stage wall time (target < 0.1);
- driver peak RSS, sampled every 0.2 s during the cluster run (target < 300 MB);
- a killed task is resubmitted: once the first shard has committed, one running download task's worker
  process (a child of one of this cluster's raylets, `ray::download_shard`) gets SIGKILL; the stage must
  resubmit it (`run.resubmitted` >= 1) and finish with every shard;
- per-row statuses (and the sha256 of every stored image) equal a single-node run's: the same manifest
  downloaded by the local runner (2 processes), against a fresh server.
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
            if cmd.startswith("ray::download_shard") and p.info["ppid"] in self.raylets:
                yield p

    def run(self) -> None:
        while not self.halt.is_set() and not list(self.out.glob("part-*.done")):
            time.sleep(0.2)
        time.sleep(1.0)
        while not self.halt.is_set() and self.killed is None:
            for p in self._candidates():
                os.kill(p.pid, signal.SIGKILL)
                self.killed = {"pid": p.pid, "cmdline": " ".join(p.cmdline()[:2]), "at": time.time()}
                break
            time.sleep(0.2)


def raylet_pids(cluster) -> set[int]:
    pids = set()
    for node in cluster.list_all_nodes():
        for info in node.all_processes.get("raylet", []):
            pids.add(info.process.pid)
    return pids


def start_cluster(cluster_cls, attempts: int = 3):
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
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-kill", action="store_true")
    args = ap.parse_args()
    rec = Recorder("download_cluster", args)

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import DownloadConfig, QueryConfig
    from pipeline.download import download
    from pipeline.query import build_manifest

    work = Path(args.workdir or tempfile.mkdtemp(prefix="webbody-bench-dlcluster-"))
    work.mkdir(parents=True, exist_ok=True)
    dl = {"allow_private_hosts": ["127.0.0.1"], "timeout": int(args.timeout), "retries": 0,
          "retry_failed": True, "thread_count": args.threads, "processes_count": 2, "task_timeout": 600}

    # -- the cluster run -----------------------------------------------------------------------------
    cluster = start_cluster(Cluster)
    try:
        with Server(args.images, kind_of, args.timeout) as base:
            lst = work / "url.lst"
            lst.write_text("".join(f"{i} id{i // 10} {base}/img/{i:06d}.jpg\n" for i in range(args.images)))
            manifest = work / "manifest"
            build_manifest(QueryConfig(inputs=[{"path": str(lst)}], shard_size=args.shard_size), manifest)
            cfg = DownloadConfig(**dl)
            rss = RssSampler()
            killer = Killer(work / "cluster", raylet_pids(cluster))
            rss.start()
            if not args.no_kill:
                killer.start()
            t0 = time.perf_counter()
            stats = download(cfg, manifest, work / "cluster", ray_address=cluster.address, executor="ray")
            cluster_wall = time.perf_counter() - t0
            rss.halt.set()
            killer.halt.set()
            rss.join()
            print("cluster run:", json.dumps(stats["run"]), flush=True)
        cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray.shutdown()
        cluster.shutdown()

    # -- the single-node run (local runner, fresh server) -----------------------------------------------
    with Server(args.images, kind_of, args.timeout) as base2:
        # the same manifest rows, the same URLs: the server's port differs, so rewrite the host in a copy
        lst2 = work / "url2.lst"
        lst2.write_text("".join(f"{i} id{i // 10} {base2}/img/{i:06d}.jpg\n" for i in range(args.images)))
        manifest2 = work / "manifest2"
        build_manifest(QueryConfig(inputs=[{"path": str(lst2)}], shard_size=args.shard_size), manifest2)
        t0 = time.perf_counter()
        single = download(DownloadConfig(**dl), manifest2, work / "single", executor="local")
        single_wall = time.perf_counter() - t0
        print("single-node run:", json.dumps(single["run"]), flush=True)

    # sample_id = sha1(label, url): the URL's port differs between the runs, so compare by row position
    # (same url.lst line -> same manifest position) via the URL path instead
    def by_path(d: Path) -> dict[str, tuple]:
        from pipeline.shards import DatasetDir

        out = {}
        for _, t in DatasetDir(d).iter_tables(columns=["url", "status", "sha256"]):
            for r in t.to_pylist():
                out[r["url"].split("/", 3)[3]] = (r["status"], r["sha256"])
        return out

    a, b = by_path(work / "cluster"), by_path(work / "single")
    mismatches = [k for k in a if a.get(k) != b.get(k)]
    identical = len(a) == len(b) == args.images and not mismatches

    run = stats["run"]
    inflight = run["in_flight"]
    first_frac = run["first_commit_seconds"] / run["wall_seconds"]
    from collections import Counter

    headlines = {
        "tasks_in_flight_median": headline(inflight.get("median"), lo=inflight.get("min"), hi=inflight.get("max"),
                                           unit="tasks", target=f"== {cluster_cpus}",
                                           note=f"{inflight.get('samples')} samples, at width "
                                                f"{inflight.get('at_width')} of the time"),
        "first_commit_fraction": headline(round(first_frac, 4), unit="of wall", target="< 0.1",
                                          note=f"first commit {run['first_commit_seconds']} s of "
                                               f"{run['wall_seconds']} s"),
        "driver_rss_mb": headline(round(rss.peak / 2**20, 1), unit="MB", target="< 300",
                                  note=f"peak of {rss.samples} samples"),
        "killed_task_resubmitted": headline(bool(killer.killed) and run["resubmitted"] >= 1 and stats["complete"],
                                            target="== true",
                                            note=f"killed {killer.killed}, resubmitted {run['resubmitted']}"),
        "statuses_equal_single_node": headline(identical, target="== true",
                                               note=f"{len(a)} rows, {len(mismatches)} differ (status and sha256)"),
    }
    details = {
        "images": args.images, "shard_size": args.shard_size, "shards": stats["shards"],
        "cluster": {"nodes": "head num_cpus=0 + 3 x 2 CPUs", "cpus": cluster_cpus, "object_store_mb": 300},
        "runs": {name: {k: v for k, v in r.items() if k in ("runner", "tasks", "resubmitted", "timed_out", "width",
                                                            "first_commit_seconds", "wall_seconds")}
                 for name, r in (("cluster (3 x 2 CPUs)", run), ("single node (2 processes)", single["run"]))},
        "cluster_run": run, "cluster_wall_seconds": round(cluster_wall, 2),
        "single_node_run": single["run"], "single_node_wall_seconds": round(single_wall, 2),
        "statuses": dict(Counter(s for s, _ in a.values())),
        "drops": stats["drops"], "notes": stats["notes"],
        "mismatch_examples": [(k, a.get(k), b.get(k)) for k in mismatches[:10]],
    }
    rec.write(headlines, details)


if __name__ == "__main__":
    main()
