"""Download tasks: a killed worker is resubmitted, a task past its time limit is cancelled and counted,
the pure per-shard function is deterministic, and the in-flight sampling counts what ran."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import BuildConfig, DownloadConfig
from pipeline.download import run as download_run
from pipeline.download.fetch import download_shard
from pipeline.download.runner import steady_in_flight
from pipeline.query import build_manifest
from pipeline.shards import DatasetDir
from tests.servers import Route, serving
from tests.test_download import JPEG, jpeg


def test_steady_in_flight_counts_running_tasks():
    # width 2: two lanes of back-to-back 1 s tasks, then a lone tail task
    lanes = [(t, t + 1.0) for t in range(0, 5)] + [(t + 0.25, t + 1.25) for t in range(0, 5)]
    st = steady_in_flight(lanes + [(6.0, 9.0)], width=2, step=0.1)
    assert st["median"] == 2 and st["min"] >= 0 and st["max"] == 2 and st["samples"] > 10
    assert steady_in_flight([(0.0, 1.0)], width=2) == {"samples": 0}


def test_download_shard_is_pure_and_deterministic():
    import pyarrow as pa

    routes = {"/a.jpg": Route(200, JPEG, jpeg(80, 60)), "/b.jpg": Route(200, JPEG, jpeg(60, 80))}
    with serving(routes) as s:
        rows = pa.table({"sample_id": ["s2", "s1", "s3", "s4"], "label": ["x", "x", "y", "y"],
                         "name": ["x", "x", "y", "y"],
                         "url": [f"{s.base_url}/b.jpg", f"{s.base_url}/a.jpg", f"{s.base_url}/a.jpg",
                                 "http://10.0.0.1/c.jpg"]})
        cfg = DownloadConfig(allow_private_hosts=["127.0.0.1"], thread_count=4, timeout=5)
        t1, st1 = download_shard(rows, cfg, "00000")
        t2, st2 = download_shard(rows, cfg, "00000")
    assert t1.equals(t2) and t1.column("sample_id").to_pylist() == ["s1", "s2", "s3", "s4"]
    assert t1.column("status").to_pylist() == ["success", "success", "success", "private_address"]
    assert st1["notes"] == {"url_reused": 1} and st1["drops"] == {"private_address": 1}
    assert {k: v for k, v in st1.items() if "seconds" not in k} == {k: v for k, v in st2.items() if "seconds" not in k}
    assert s.hits["/a.jpg"] == 2  # once per call: the duplicate within the shard is fetched once


def _manifest(tmp_path, lines: list[str], shard_size: int, download: dict, run: dict | None = None):
    (tmp_path / "url.lst").write_text("".join(lines))
    cfg = BuildConfig.model_validate({
        "run": run or {"executor": "local"},
        "query": {"inputs": [{"path": str(tmp_path / "url.lst")}], "shard_size": shard_size},
        "download": {"allow_private_hosts": ["127.0.0.1"], **download},
    })
    build_manifest(cfg.query, tmp_path / "query")
    return cfg


@pytest.mark.slow
def test_killed_pool_process_is_resubmitted(tmp_path):
    import psutil

    routes = {f"/p{i}.jpg": Route(200, JPEG, jpeg(50 + i, 40), delay=1.5) for i in range(4)}
    with serving(routes) as server:
        lines = [f"{i} A{i} {server.base_url}/p{i}.jpg\n" for i in range(4)]
        cfg = _manifest(tmp_path, lines, 2, {"processes_count": 2, "thread_count": 1, "timeout": 20})
        killed: list[int] = []

        def kill_one_worker() -> None:
            # once the server sees a request, a pool process is mid-task: SIGKILL one of them
            deadline = time.time() + 300
            while not sum(server.hits.values()) and time.time() < deadline:
                time.sleep(0.05)
            kids = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
            if kids:
                kids[0].kill()
                killed.append(kids[0].pid)

        killer = threading.Thread(target=kill_one_worker, daemon=True)
        killer.start()
        stats = download_run(cfg, {"query": tmp_path / "query"}, tmp_path / "download")
        killer.join(timeout=5)
    assert killed, "no pool process was found to kill"
    assert stats["complete"] and stats["rows_out"] == 4 and stats["drops"] == {}
    assert stats["run"]["resubmitted"] >= 1 and stats["run"]["failed_shards"] == []
    assert DatasetDir(tmp_path / "download").done_ids() == ["00000", "00001"]


@pytest.mark.slow
@pytest.mark.integration
def test_ray_task_past_its_time_limit_is_cancelled_resubmitted_then_counted(tmp_path, ray_local):
    import ray

    address = ray.get_runtime_context().gcs_address
    routes = {"/stall.jpg": Route(200, JPEG, jpeg(20, 20), delay=60)}
    with serving(routes) as server:
        lines = [f"0 A {server.base_url}/stall.jpg\n"]
        cfg = _manifest(tmp_path, lines, 1, {"timeout": 50, "retries": 0, "task_timeout": 4, "task_attempts": 2},
                        run={"executor": "ray", "ray_address": address})
        t0 = time.perf_counter()
        stats = download_run(cfg, {"query": tmp_path / "query"}, tmp_path / "download")
        wall = time.perf_counter() - t0
    assert wall < 40  # two 4 s attempts (plus worker start-up), not the 50 s URL timeout
    run = stats["run"]
    assert run["timed_out"] == 2 and run["resubmitted"] == 1 and run["failed_shards"] == ["00000"]
    assert stats["complete"] and stats["drops"] == {"task_failed": 1} and stats["rows_out"] == 0
    row = DatasetDir(tmp_path / "download").read_shard("00000").to_pylist()[0]
    assert row["status"] == "task_failed" and "task_timeout" in row["error"]
