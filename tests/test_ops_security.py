"""Security rules of docs/security.md, checked on the code and on real objects.

- every checkpoint read in the project is weights-only (`torch.load(..., weights_only=True)` or safetensors),
  and a malicious pickle handed to the checkpoint reader runs nothing;
- no unsafe deserialisers in library code (pickle, yaml.load without SafeLoader, eval/exec, numpy pickles);
- Prefect's server auth (`PREFECT_SERVER_API_AUTH_STRING`) refuses unauthenticated API calls and accepts
  the client configured with `PREFECT_API_AUTH_STRING`; health probes stay open;
- the secret scanner finds each kind of leak and stays quiet on the project's real configs.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import os
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.secret_scan import scan_for_secrets, secret_values_from_env

REPO = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = ["pipeline", "flows", "sapiensid", "schemas", "benchmarks"]


def _python_files() -> list[Path]:
    return sorted(p for d in LIBRARY_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    f = node.func
    parts = []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    # `model.eval()` on a call result is not the builtin eval: mark chains that do not start at a name.
    parts.append(f.id if isinstance(f, ast.Name) else "?")
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only():
    bad = []
    n = 0
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _call_name(node) == "torch.load":
                n += 1
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert n > 0, "no torch.load found at all: the check looks in the wrong place"
    assert bad == [], "torch.load without weights_only=True at " + ", ".join(bad)


def test_no_unsafe_deserialisers_in_library_code():
    bad = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "eval", "exec",
                        "marshal.loads", "dill.load", "dill.loads", "joblib.load"):
                bad.append(where)
            elif name == "yaml.load":
                loader = _kw(node, "Loader")
                if loader is None or "Safe" not in ast.unparse(loader):
                    bad.append(where)
            elif name in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    bad.append(where)
    assert bad == [], "unsafe deserialisation: " + ", ".join(bad)


def test_pose_models_load_only_through_the_restricted_loader():
    """`YOLO(path)` unpickles a checkpoint fully; the one place that may call it is pipeline/persons.py's
    `load_pose_model`, which wraps it in Ultralytics' weights-only load (tests/test_persons.py)."""
    calls = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _call_name(node).split(".")[-1] == "YOLO":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert calls and all(c.startswith("pipeline/persons.py:") for c in calls), calls


class _Payload:
    """A pickle that, when loaded without weights_only, creates a file (stands in for running a command)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_malicious_checkpoint_runs_nothing(tmp_path):
    import torch

    from sapiensid.checkpoint import read_state_dict

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "extra": _Payload(marker)}, ckpt)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(ckpt)
    assert not marker.exists(), "loading the checkpoint executed code"
    # The same file through plain pickle would run it: the test's payload is real.
    with open(ckpt, "rb") as fh:
        head = fh.read(2)
    assert head == b"PK"  # torch's zip container; its data.pkl holds the payload
    # A clean tensor-only checkpoint loads.
    torch.save({"weight": torch.ones(2)}, tmp_path / "ok.pt")
    assert read_state_dict(tmp_path / "ok.pt")["weight"].sum().item() == 2.0


# -- every loader, one crafted pickle each ----------------------------------------------------------------


def _torch_payload(path: Path, marker: Path, **state) -> Path:
    import torch

    torch.save({**state, "extra": _Payload(marker)}, path)
    return path


def _bin_payload(path: Path, marker: Path) -> Path:
    # The verification-set layout (encoded images, same flags) with the payload among the images.
    path.write_bytes(pickle.dumps(([b"\xff\xd8", _Payload(marker)], [True]), protocol=4))
    return path


def _load_checkpoint_reader(tmp: Path, marker: Path) -> None:
    from sapiensid.checkpoint import read_state_dict

    read_state_dict(_torch_payload(tmp / "evil.pt", marker))


def _load_sapiensid_weights(tmp: Path, marker: Path) -> None:
    from sapiensid.config import SapiensIDConfig
    from sapiensid.model import SapiensID, load_sapiensid_weights

    load_sapiensid_weights(SapiensID(SapiensIDConfig.preset("tiny")), _torch_payload(tmp / "evil.pth", marker))


def _load_kprpe_face_weights(tmp: Path, marker: Path) -> None:
    from sapiensid.kprpe_face import build_kprpe_face_vit, load_kprpe_face_weights

    load_kprpe_face_weights(build_kprpe_face_vit("tiny"), _torch_payload(tmp / "model.pt", marker))


def _load_trained_model(tmp: Path, marker: Path) -> None:
    from sapiensid.train import load_trained_model

    step = tmp / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    _torch_payload(step / "model.pt", marker, model_config={"preset": "tiny"})
    (step / "DONE").write_text("{}")
    load_trained_model(tmp / "run")


def _resume_training(tmp: Path, marker: Path) -> None:
    from sapiensid.data.synthetic import write_shards
    from sapiensid.train import TrainConfig, Trainer

    write_shards(tmp / "shards", 2, 2, samples_per_shard=8)
    cfg = TrainConfig(train_shards=str(tmp / "shards"), output_dir=str(tmp / "run"), model="tiny", batch_size=2,
                      keep_tokens=32, num_workers=0, shuffle_buffer=2, max_steps=2, warmup_steps=1,
                      tensorboard=False, progress=False)
    trainer = Trainer(cfg)
    step = tmp / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    # A checkpoint directory as the trainer writes it: a clean model.pt, the payload in the per-rank file.
    import torch

    torch.save({"model": trainer.model.state_dict(), "optimizer": trainer.opt_model.state_dict(), "step": 1,
                "world": 1}, step / "model.pt")
    _torch_payload(step / "rank0.pt", marker)
    (step / "DONE").write_text("{}")
    trainer.fit()


def _load_valset_bin(tmp: Path, marker: Path) -> None:
    from pipeline.valsets import read_bin

    read_bin(_bin_payload(tmp / "lfw.bin", marker))


def _load_verification_bin(tmp: Path, marker: Path) -> None:
    from sapiensid.verification import load_bin

    load_bin(_bin_payload(tmp / "lfw.bin", marker))


LOADERS = {
    "sapiensid.checkpoint.read_state_dict": (_load_checkpoint_reader, "weights-only"),
    "sapiensid.model.load_sapiensid_weights": (_load_sapiensid_weights, "weights-only"),
    "sapiensid.kprpe_face.load_kprpe_face_weights": (_load_kprpe_face_weights, "weights-only"),
    "sapiensid.train.load_trained_model": (_load_trained_model, "Weights only load failed"),
    "sapiensid.train.Trainer resume": (_resume_training, "Weights only load failed"),
    "pipeline.valsets.read_bin": (_load_valset_bin, "not allowed in a verification .bin"),
    "sapiensid.verification.load_bin": (_load_verification_bin, "refusing global"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_a_crafted_pickle(loader, tmp_path):
    """Each loader gets a file whose pickle would create `marker` when unpickled: a clear refusal, no file."""
    fn, message = LOADERS[loader]
    marker = tmp_path / "pwned"
    with pytest.raises(Exception, match=message) as err:
        fn(tmp_path, marker)
    # The payload pickles as getattr(Path, "write_text")(marker, ...): the refusal names the global it refused.
    assert re.search(r"getattr|pathlib|PosixPath|write_text", str(err.value)), \
        f"the refusal does not name the refused global: {err.value}"
    assert not marker.exists(), f"{loader} executed code from the file"


# -- Prefect server auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_app():
    from prefect.server.api.server import create_api_app
    from prefect.settings import PREFECT_SERVER_API_AUTH_STRING, temporary_settings

    with temporary_settings({PREFECT_SERVER_API_AUTH_STRING: "admin:test-Auth-9921"}):
        yield create_api_app()


def test_prefect_server_auth_refuses_anonymous_calls(auth_app):
    from starlette.testclient import TestClient

    client = TestClient(auth_app)
    assert client.get("/health").status_code == 200  # probes stay open (compose healthcheck)
    assert client.get("/admin/version").status_code == 401
    assert client.get("/admin/version", auth=("admin", "wrong")).status_code == 401
    assert client.get("/admin/version", headers={"Authorization": "Bearer test-Auth-9921"}).status_code == 401
    ok = client.get("/admin/version", auth=("admin", "test-Auth-9921"))
    assert ok.status_code == 200 and ok.json().startswith("3.")


def test_prefect_client_sends_configured_auth(auth_app):
    from fastapi import FastAPI
    from prefect.client.orchestration import PrefectClient

    server = FastAPI()
    server.mount("/api", auth_app)  # the client addresses an in-process app at <base>/api, like `prefect server`

    async def version(auth: str | None) -> str:
        async with PrefectClient(server, auth_string=auth) as client:
            return await client.api_version()

    assert asyncio.run(version("admin:test-Auth-9921")).startswith("3.")
    with pytest.raises(Exception, match="401"):
        asyncio.run(version("admin:nope"))


# -- secret scanner -------------------------------------------------------------------------------------------


def test_scanner_finds_each_kind_of_leak(tmp_path):
    secret = "s3cr3t-Value-0042"
    (tmp_path / "run.log").write_text(f"connecting with {secret}\n")
    (tmp_path / "headers.log").write_text(
        "GET /api/flows Authorization: Basic " + base64.b64encode(b"admin:" + secret.encode()).decode() + "\n")
    (tmp_path / "b64.txt").write_text(base64.b64encode(secret.encode()).decode())
    (tmp_path / "cfg.yaml").write_text("db: postgresql://prefect:hunter2hunter@db:5432/prefect\npassword: letmein99\n")
    (tmp_path / "key.pem").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    (tmp_path / "tok.json").write_text('{"hub": "hf_' + "a" * 34 + '", "gh": "ghp_' + "b" * 36 + '"}')
    pq.write_table(pa.table({"name": ["ok", "AKIA" + "A" * 16]}), tmp_path / "rows.parquet")
    sub = tmp_path / "shards"
    sub.mkdir()
    (sub / "sample.json").write_bytes(b'{"url": "https://u:pw-' + secret.encode() + b'@example.org/x.jpg"}')

    findings = scan_for_secrets(tmp_path, env={"MY_API_TOKEN": secret})
    kinds = {(f.path, f.kind) for f in findings}
    assert ("run.log", "value_of:MY_API_TOKEN") in kinds
    assert ("headers.log", "basic_auth_header") in kinds
    assert ("b64.txt", "base64_value_of:MY_API_TOKEN") in kinds
    assert ("cfg.yaml", "url_password") in kinds and ("cfg.yaml", "literal_setting") in kinds
    assert ("key.pem", "private_key") in kinds
    assert ("tok.json", "huggingface_token") in kinds and ("tok.json", "github_token") in kinds
    assert ("rows.parquet", "aws_access_key") in kinds  # found inside a compressed shard
    assert (str(Path("shards") / "sample.json"), "url_password") in kinds
    # Findings never print the secret itself.
    assert all(secret not in str(f) and "hunter2hunter" not in str(f) for f in findings)


def test_scanner_is_quiet_on_references_and_real_configs(tmp_path):
    (tmp_path / "ok.yaml").write_text(
        "password: ${POSTGRES_PASSWORD}\n"
        "url: postgresql+asyncpg://prefect:${POSTGRES_PASSWORD:?set it}@postgres:5432/prefect\n"
        "token: null\napi_key: <your key>\nauth_string:\n"
    )
    assert scan_for_secrets(tmp_path, env={}) == []
    real = [REPO / "configs", REPO / "docker", REPO / "prefect.yaml", REPO / "pyproject.toml"]
    findings = [f for p in real if p.exists() for f in scan_for_secrets(p, env={})]
    assert findings == [], "\n".join(map(str, findings))


def test_secret_env_values_are_picked_by_name():
    env = {"PREFECT_API_AUTH_STRING": "admin:abcdef", "HF_TOKEN": "hf_xyzxyzxyz", "RAY_USAGE_STATS_ENABLED": "0",
           "POSTGRES_PASSWORD": "short", "PATH": "/usr/bin"}
    assert set(secret_values_from_env(env)) == {"PREFECT_API_AUTH_STRING", "HF_TOKEN"}
    assert "PATH" not in secret_values_from_env(os.environ)


def test_pickle_payload_is_real(tmp_path):
    # Guard for test_malicious_checkpoint_runs_nothing: plain pickle really executes the payload.
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(target)))  # noqa: S301 - deliberate, on our own bytes
    assert target.read_text() == "pwned"
