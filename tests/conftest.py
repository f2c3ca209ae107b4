"""Test harness: offline, loopback-only environment set before any library starts Ray or Prefect."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Isolate Prefect's home per test session, and never let a test reach beyond loopback.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="webbody-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("WEBBODY_PROGRESS", "off")

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by the tests that need it (starting Ray costs seconds and ~700 MB)."""
    from pipeline.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP
