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
from tests.servers import free_port, s3_environment  # noqa: E402

ensure_offline_env()

# The S3 endpoint (a moto server started on first use by the `s3_server` fixture) and dummy credentials are
# set for the whole session before anything starts Ray, so Ray workers and subprocesses inherit them; no
# test can ever reach a real AWS account.
_S3_PORT = free_port()
os.environ.update(s3_environment(_S3_PORT))
for _k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
    os.environ.pop(_k, None)
os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(_SESSION_TMP / "no-aws-config")


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


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (its own process), reached through AWS_ENDPOINT_URL as a user's S3."""
    from tests.servers import moto_s3

    with moto_s3(_S3_PORT) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for one test: `s3://<name>`."""
    import uuid

    from pipeline import storage
    from tests.servers import make_bucket

    storage.reset_filesystems()
    return make_bucket(f"t-{uuid.uuid4().hex[:12]}")
