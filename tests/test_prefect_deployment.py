"""A real Prefect server on 127.0.0.1, a process worker, `prefect deploy`, and
`prefect deployment run 'webbody-build/local'` until the flow run is Completed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from flows.demo import serve_directory

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


def _run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_deployment_run_completes(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "WEBBODY_HOME": str(ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    })
    env.pop("PREFECT_API_KEY", None)
    # A tiny corpus served on loopback: two real photos, one broken URL.
    files = tmp_path / "files"
    files.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (200, 30, 30) if name == "a.jpg" else (30, 30, 200)).save(files / name)
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    worker = None
    try:
        _wait_healthy(api)
        _run([PREFECT, "work-pool", "create", "local-pool", "--type", "process"], env)
        _run([PREFECT, "--no-prompt", "deploy", "--name", "local"], env, timeout=180)
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "local-pool"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        with serve_directory(files) as base:
            url_list = tmp_path / "url.lst"
            url_list.write_text(f"0 alice {base}/a.jpg\n1 alice {base}/b.jpg\n2 bob {base}/missing.jpg\n")
            config = tmp_path / "config.yaml"
            config.write_text(
                "name: deploytest\nrun: {executor: local}\n"
                f"query: {{inputs: [{{path: {url_list}, format: url_lst}}], shard_size: 2}}\n"
                "download: {processes_count: 1, thread_count: 2, timeout: 5, retries: 0, "
                "allow_private_hosts: ['127.0.0.1']}\n"
            )
            out = tmp_path / "build"
            proc = _run(
                [PREFECT, "deployment", "run", "webbody-build/local",
                 "--param", f"config_path={config}", "--param", f"output={out}", "--param", "until=download",
                 "--watch", "--watch-timeout", "400"],
                env, timeout=450,
            )
        assert "Completed" in proc.stdout + proc.stderr
        assert (out / "download" / "stats.json").exists()
        assert (out / "stats.json").exists()
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp_path / "prefect_home", ignore_errors=True)
