"""Secret hygiene: find credentials that leaked into configs, logs or build artifacts.

Secrets reach WebBody only through the environment or Prefect blocks (docs/security.md); none may be
written to a config, a log line, a stats file, a parquet shard or a tar. `scan_for_secrets(dir)` looks for

- the values of secret-looking environment variables (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`,
  `*AUTH_STRING*`, `*API_KEY*`, ...) and of any values passed in, also in their base64 form (as they
  appear in a leaked `Authorization: Basic ...` header);
- well-known credential formats (private keys, cloud and hub tokens, Prefect API keys);
- passwords embedded in URLs (`scheme://user:password@host`) and literal `password: ...` style settings.

Text files are read as text; parquet shards by their string columns and metadata (they are compressed,
so their bytes would hide a secret); anything else (tar shards, images) as raw bytes.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SECRET_ENV_RE = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|AUTH_STRING|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)",
                           re.IGNORECASE)
MIN_SECRET_LEN = 6  # shorter env values ("0", "true") would match everywhere and protect nothing

PATTERNS: dict[str, re.Pattern[bytes]] = {
    "private_key": re.compile(rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY( BLOCK)?-----"),
    "aws_access_key": re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "huggingface_token": re.compile(rb"\bhf_[A-Za-z0-9]{30,}\b"),
    "github_token": re.compile(rb"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b"),
    "prefect_api_key": re.compile(rb"\bpnu_[A-Za-z0-9]{30,}\b"),
    "slack_token": re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "wandb_key": re.compile(rb"\bWANDB_API_KEY\s*[=:]\s*['\"]?[0-9a-f]{40}\b"),
    # user:password@ in a URL; ${VAR} / <placeholder> / *** passwords are references, not secrets.
    "url_password": re.compile(rb"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?!\$\{|<|\*{3})[^/\s@'\"]{3,}@[^\s/'\"]+"),
    "basic_auth_header": re.compile(rb"Authorization:\s*Basic\s+[A-Za-z0-9+/=]{8,}", re.IGNORECASE),
    # `password: hunter22` / `api_key = "..."` literal settings (YAML, INI, env files, logs).
    "literal_setting": re.compile(
        rb"(?im)^[ \t-]*['\"]?[A-Za-z0-9_.]*(?:password|passwd|secret|token|api_key|auth_string)['\"]?[ \t]*[:=][ \t]*"
        rb"(?![ \t]*(?:\$\{|<|null\b|None\b|~|''|\"\"|\*{3}|$))['\"]?[^\s'\"#]{6,}"
    ),
}

MAX_BYTES = 512 * 2**20  # read at most this much of one file (in chunks)
CHUNK = 8 * 2**20
OVERLAP = 4096  # chunks overlap so a secret across a chunk boundary is still found


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str
    excerpt: str  # the match with the secret itself masked, safe to print

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.excerpt}"


def secret_values_from_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Name -> value of environment variables whose names say they hold a secret."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if SECRET_ENV_RE.search(k) and len(v) >= MIN_SECRET_LEN}


def _mask(text: bytes) -> str:
    s = text.decode("utf-8", "replace")
    return s[:4] + "***" if len(s) > 4 else "***"


def _needles(values: Mapping[str, str]) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for name, value in values.items():
        raw = value.encode()
        out[raw] = f"value_of:{name}"
        out[base64.b64encode(raw)] = f"base64_value_of:{name}"
    return out


def scan_bytes(data: bytes, where: str, needles: Mapping[bytes, str],
               patterns: Mapping[str, re.Pattern[bytes]] = PATTERNS) -> list[Finding]:
    found: list[Finding] = []
    for needle, kind in needles.items():
        if needle and needle in data:
            found.append(Finding(where, kind, _mask(needle)))
    for kind, pat in patterns.items():
        for m in pat.finditer(data):
            found.append(Finding(where, kind, _mask(m.group(0))))
    return found


def _parquet_payload(path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    parts = [repr(table.schema.metadata or {}).encode()]
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            parts.extend(v.encode() for v in col.to_pylist() if v)
        elif pa.types.is_list(col.type) and pa.types.is_string(col.type.value_type):
            parts.extend(v.encode() for vs in col.to_pylist() if vs for v in vs if v)
    return b"\n".join(parts)


def _chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as fh:
        tail = b""
        read = 0
        while read < MAX_BYTES:
            block = fh.read(CHUNK)
            if not block:
                break
            read += len(block)
            yield tail + block
            tail = block[-OVERLAP:]


def scan_file(path: Path, needles: Mapping[bytes, str], root: Path | None = None) -> list[Finding]:
    where = str(path.relative_to(root)) if root else str(path)
    if path.suffix == ".parquet":
        try:
            return scan_bytes(_parquet_payload(path), where, needles)
        except Exception:  # noqa: BLE001 - not a readable parquet: fall back to its raw bytes
            pass
    found: dict[tuple[str, str], Finding] = {}
    for chunk in _chunks(path):
        for f in scan_bytes(chunk, where, needles):
            found.setdefault((f.kind, f.excerpt), f)  # overlapping chunks report a match once
    return list(found.values())


def scan_for_secrets(root: str | os.PathLike, extra_values: Mapping[str, str] | Iterable[str] = (),
                     env: Mapping[str, str] | None = None, skip_dirs: Iterable[str] = (".git", ".venv")) -> list[Finding]:
    """Every place under `root` (a file or a directory) where a secret appears. Empty list = clean."""
    root = Path(root)
    values = dict(secret_values_from_env(env))
    if isinstance(extra_values, Mapping):
        values.update(extra_values)
    else:
        values.update({f"extra_{i}": v for i, v in enumerate(extra_values)})
    needles = _needles({k: v for k, v in values.items() if len(v) >= MIN_SECRET_LEN})
    if root.is_file():
        return scan_file(root, needles)
    skip = set(skip_dirs)
    findings: list[Finding] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                findings.extend(scan_file(p, needles, root))
    return findings
