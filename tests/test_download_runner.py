"""Download units on the contract: the per-shard function is pure and deterministic, a killed Ray worker's
shard is run again with the same result, and a shard that keeps failing is committed as task_failed."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from pipeline.config import BuildConfig, DownloadConfig
from pipeline.download import run as download_run
from pipeline.download.fetch import download_shard, failed_shard
from pipeline.query import build_manifest
from pipeline.shards import DatasetDir
from tests.servers import LoopbackServer, Route, serving
from tests.test_download import JPEG, jpeg


def test_download_shard_is_pure_and_deterministic():
    routes = {"/a.jpg": Route(200, JPEG, jpeg(80, 60)), "/b.jpg": Route(200, JPEG, jpeg(60, 80))}
    with serving(routes) as s:
        rows = pa.table({"sample_id": ["s2", "s1", "s3", "s4"], "source_label": ["x", "x", "y", "y"],
                         "name": ["x", "x", "y", "y"],
                         "url": [f"{s.base_url}/b.jpg", f"{s.base_url}/a.jpg", f"{s.base_url}/a.jpg",
                                 "http://10.0.0.1/c.jpg"]})
        cfg = DownloadConfig(allow_private_hosts=["127.0.0.1"], thread_count=4, timeout=5)
        t1, st1 = download_shard(rows, cfg, "00000")
        t2, st2 = download_shard(rows, cfg, "00000")
    assert t1.equals(t2) and t1.column("sample_id").to_pylist() == ["s1", "s2", "s3", "s4"]
    assert t1.column("status").to_pylist() == ["success", "success", "success", "private_address"]
    assert st1["notes"] == {"url_reused": 1} and st1["drops"] == {"private_address": 1} and st1["rows_out"] == 3
    assert {k: v for k, v in st1.items() if "seconds" not in k} == {k: v for k, v in st2.items() if "seconds" not in k}
    assert s.hits["/a.jpg"] == 2  # once per call: the duplicate within the shard is fetched once


class _GatedServer(LoopbackServer):
    """/gate.jpg is answered only once /flaky.jpg has been asked a second time (or after 60 s)."""

    def __init__(self, routes):
        super().__init__(routes)
        self.flaky_retried = threading.Event()

    def count(self, path: str) -> int:
        earlier = super().count(path)
        if path == "/flaky.jpg" and earlier == 1:
            self.flaky_retried.set()
        if path == "/gate.jpg":
            self.flaky_retried.wait(60)
        return earlier


def test_retries_run_beside_the_first_pass():
    """A transient failure is retried while the first pass still runs, not after it: /gate.jpg (first
    pass) answers only after /flaky.jpg's retry has arrived, within the client timeout (20 s) only if that
    retry did not wait for the first pass to end. Statuses: each URL at most twice, permanent failures
    once."""
    body = jpeg(64, 48)
    routes = {"/gate.jpg": Route(200, JPEG, body), "/ok.jpg": Route(200, JPEG, body),
              "/flaky.jpg": [Route(503, {"Content-Type": "text/plain"}, b"busy"), Route(200, JPEG, body)],
              "/gone.jpg": Route(404, {"Content-Type": "text/plain"}, b"no")}
    server = _GatedServer(routes)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = server.base_url
        names = ["gate", "ok", "flaky", "gone"]
        rows = pa.table({"sample_id": [f"s{i}" for i in range(4)], "source_label": names, "name": names,
                         "url": [f"{base}/{n}.jpg" for n in names]})
        cfg = DownloadConfig(allow_private_hosts=["127.0.0.1"], thread_count=4, timeout=20, retries=0)
        table, stats = download_shard(rows, cfg, "00000")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert table.column("status").to_pylist() == ["success", "success", "success", "http_404"]
    assert stats["notes"] == {"recovered_by_retry": 1, "retried": 1}
    assert server.hits == {"/gate.jpg": 1, "/ok.jpg": 1, "/flaky.jpg": 2, "/gone.jpg": 1}


def test_no_retry_starts_past_the_task_time_limit():
    """A retry that could push the shard's task past `download.task_timeout` is not started: the row keeps
    its first status and is counted (the executor would otherwise cancel the task and redo the shard)."""
    body = jpeg(64, 48)
    routes = {"/ok.jpg": Route(200, JPEG, body), "/stall.jpg": Route(200, JPEG, body, delay=8.0)}
    with serving(routes) as s:
        names = ["ok", "stall"]
        rows = pa.table({"sample_id": ["s0", "s1"], "source_label": names, "name": names,
                         "url": [f"{s.base_url}/{n}.jpg" for n in names]})
        # retries start until 5 x 0.95 - 4 = 0.75 s after the shard began; /stall.jpg fails at 4 s at the earliest
        cfg = DownloadConfig(allow_private_hosts=["127.0.0.1"], thread_count=2, timeout=4, retries=0,
                             task_timeout=5)
        table, stats = download_shard(rows, cfg, "00000")
        hits = dict(s.hits)
    assert table.column("status").to_pylist() == ["success", "timeout"]
    assert stats["notes"] == {"retry_skipped_time_limit": 1} and hits == {"/ok.jpg": 1, "/stall.jpg": 1}


def test_failed_shard_keeps_every_row_counted():
    rows = pa.table({"sample_id": ["b", "a"], "source_label": ["x", "y"], "name": ["x", "y"],
                     "url": ["http://h/1.jpg", "http://h/2.jpg"]})
    table, stats = failed_shard(rows, "00003", "task_failed", "attempt 3: OSError: boom")
    assert table.column("sample_id").to_pylist() == ["a", "b"]
    assert set(table.column("status").to_pylist()) == {"task_failed"} and table.column("image").null_count == 2
    assert stats["drops"] == {"task_failed": 2} and stats["rows_in"] == 2 and stats["rows_out"] == 0


@pytest.mark.slow
@pytest.mark.integration
def test_killed_ray_worker_shard_runs_again_with_the_same_rows(tmp_path, ray_local):
    import psutil
    import ray

    address = ray.get_runtime_context().gcs_address
    routes = {f"/p{i}.jpg": Route(200, JPEG, jpeg(50 + i, 40), delay=1.0) for i in range(4)}
    with serving(routes) as server:
        (tmp_path / "url.lst").write_text("".join(f"{i} A{i} {server.base_url}/p{i}.jpg\n" for i in range(4)))
        cfg = BuildConfig.model_validate({
            "run": {"executor": "ray", "ray_address": address},
            "query": {"inputs": [{"path": str(tmp_path / "url.lst")}], "shard_size": 2},
            "download": {"allow_private_hosts": ["127.0.0.1"], "thread_count": 1, "timeout": 20},
        })
        build_manifest(cfg.query, tmp_path / "query")
        killed: list[int] = []

        def kill_one_task() -> None:
            # once the server sees a request a task is mid-download: SIGKILL the worker process running it
            deadline = time.time() + 300
            while not sum(server.hits.values()) and time.time() < deadline:
                time.sleep(0.05)
            for p in psutil.Process().children(recursive=True):
                try:
                    if " ".join(p.cmdline()).startswith("ray::_ray_execute"):
                        p.kill()
                        killed.append(p.pid)
                        return
                except psutil.NoSuchProcess:
                    continue

        killer = threading.Thread(target=kill_one_task, daemon=True)
        killer.start()
        stats = download_run(cfg, {"query": tmp_path / "query"}, tmp_path / "download")
        killer.join(timeout=5)
    assert killed, "no running download task was found to kill"
    assert stats["complete"] and stats["rows_out"] == 4 and stats["drops"] == {}
    assert stats["run"]["resubmitted"] >= 1 and stats["run"]["failed"] == []
    out = DatasetDir(tmp_path / "download")
    assert out.done_ids() == ["00000", "00001"]
    rows = [r for _, t in out.iter_tables(columns=["status", "width"]) for r in t.to_pylist()]
    assert rows == [{"status": "success", "width": 640}] * 4
