"""Shard files of a stage's dataset directory, and the atomic-write rules of the stage contract.

A dataset directory holds, per shard id `NNNNN`:
  part-NNNNN.parquet     the shard's rows (written under a temporary name, then renamed)
  part-NNNNN.stats.json  rows in/out and a count per drop reason (written after the parquet)
  part-NNNNN.done        the completion marker, written last; it names the parquet's row count and hash
plus `_stage.json` (stage name + config hash) and, once every shard is done, `stats.json` (the roll-up).
A reader trusts a shard only when its marker exists, so a run killed at any instant leaves either a
finished shard or one that the next run redoes from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")


def shard_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def format_shard_id(i: int) -> str:
    return f"{i:05d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file, nothing, or the whole new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # Fixed writer options and no timestamps in metadata: same rows -> byte-identical file.
        pq.write_table(table, tmp, compression="zstd", use_dictionary=True, write_statistics=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DatasetDir:
    """A stage's dataset directory (input or output)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def parquet(self, shard_id: str) -> Path:
        return self.root / shard_name(shard_id)

    def stats_path(self, shard_id: str) -> Path:
        return self.root / f"part-{shard_id}.stats.json"

    def marker(self, shard_id: str) -> Path:
        return self.root / f"part-{shard_id}.done"

    def shard_ids(self) -> list[str]:
        """Every shard id with a parquet file present (finished or not), sorted."""
        if not self.root.is_dir():
            return []
        ids = [m.group(1) for p in self.root.iterdir() if (m := SHARD_RE.match(p.name))]
        return sorted(ids)

    def is_done(self, shard_id: str) -> bool:
        marker = self.marker(shard_id)
        if not marker.exists() or not self.parquet(shard_id).exists():
            return False
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        # A marker whose parquet was replaced behind its back is not trusted.
        return info.get("bytes") == self.parquet(shard_id).stat().st_size

    def done_ids(self) -> list[str]:
        return [s for s in self.shard_ids() if self.is_done(s)]

    def complete(self) -> bool:
        """True when the directory has a roll-up (every shard of its run finished)."""
        return (self.root / "stats.json").exists()

    def read_shard(self, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.parquet(shard_id), columns=columns)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for sid in self.done_ids():
            yield sid, self.read_shard(sid, columns)

    def num_rows(self, shard_id: str) -> int:
        return pq.ParquetFile(self.parquet(shard_id)).metadata.num_rows

    def shard_stats(self, shard_id: str) -> dict:
        return json.loads(self.stats_path(shard_id).read_text())

    def commit_shard(self, shard_id: str, table: pa.Table, stats: dict) -> None:
        """The contract's write order: parquet (atomic), stats (atomic), marker (atomic) last."""
        self.marker(shard_id).unlink(missing_ok=True)
        path = self.parquet(shard_id)
        atomic_write_parquet(path, table)
        atomic_write_json(self.stats_path(shard_id), stats)
        marker = {"rows": table.num_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        atomic_write_json(self.marker(shard_id), marker)

    def clean_temporaries(self) -> int:
        """Remove half-written temporaries left by a killed run (never visible to readers anyway)."""
        n = 0
        if self.root.is_dir():
            for p in self.root.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n


def claim_output(root: Path, meta: dict, overwrite: bool) -> bool:
    """Record in `root/_stage.json` which stage and config own this output directory.

    Returns True when an earlier run with a different `meta` owned it (the caller then discards that
    run's results); raises ValueError with what to do when that happens without `overwrite`, so two
    configs never mix in one directory. Shared by the per-shard executors and the bundle.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "_stage.json"
    changed = False
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            if not overwrite:
                raise OutputClaimError(
                    f"{root} holds output of {old}, but this run is {meta}: use a new output directory, "
                    "or pass overwrite=True (--overwrite) to redo it"
                )
            changed = True
    atomic_write_json(path, meta)
    return changed


class OutputClaimError(ValueError):
    pass

