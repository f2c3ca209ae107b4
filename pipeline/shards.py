"""Shard files of a stage's dataset directory (a local folder or an object-store prefix), and the commit rules.

A dataset directory holds, per shard id `NNNNN`:
  part-NNNNN.parquet     the shard's rows
  part-NNNNN.stats.json  rows in/out and a count per drop reason
  part-NNNNN.done        the completion marker, written LAST: the parquet's row count, size and sha256,
                         and the size and sha256 of every extra object committed with the shard
plus `_stage.json` (stage name + config hash) and, once every shard is done, `stats.json` (the roll-up).

Commit = parquet PUT, stats PUT, marker PUT, each atomic (pipeline/storage.put_bytes: temporary file +
fsync + rename locally, one PUT on an object store). A reader trusts a shard only when its marker exists,
so a run killed at any instant leaves finished shards, and shards without a marker that the next run
redoes from scratch.

Completion is found with ONE listing of the directory (`listing()`, cached; `refresh()` re-lists; the
listing is a snapshot: this object's own writes update it, other processes' writes need `refresh()`):
`is_done(sid)` is "marker and parquet both listed". The marker's size and sha256 are checked where the
bytes are read anyway (`read_shard(sid, verify=True)`, what executors' workers do), so a parquet replaced
behind its marker's back is caught without a request per shard on the driver.

`root` is a `Path` for local directories (as before); on object stores use `uri` and these methods:
`root` raises there, so code not yet ported fails loudly instead of writing a local `s3:/...` folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.storage import StorageError, Uri

SHARD_RE = re.compile(r"^part-(\d{5,})\.parquet$")
SHARD_ID_RE = re.compile(r"^\d{5,}$")
STAGE_META = "_stage.json"
ROLLUP = "stats.json"


def shard_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def format_shard_id(i: int) -> str:
    return f"{i:05d}"


def check_shard_id(shard_id: str) -> str:
    if not isinstance(shard_id, str) or not SHARD_ID_RE.match(shard_id):
        raise ValueError(f"shard id {shard_id!r} is not 5+ digits (use pipeline.shards.format_shard_id)")
    return shard_id


# -- compatibility helpers (kept for callers outside the executors; all go through storage) -----------------


def atomic_write_bytes(path: Uri, data: bytes) -> None:
    """Write `data` so that readers see either the old object, nothing, or the whole new one."""
    storage.put_bytes(path, data)


def atomic_write_json(path: Uri, obj: Any) -> None:
    storage.put_json(path, obj)


def atomic_write_parquet(path: Uri, table: pa.Table) -> None:
    storage.write_parquet(path, table)


def file_sha256(path: Uri) -> str:
    return storage.sha256_of(path)


class ShardCorrupt(StorageError):
    """A shard's bytes differ from what its marker recorded."""


class DatasetDir:
    """A stage's dataset directory (input or output), local or on an object store."""

    def __init__(self, root: Uri):
        if isinstance(root, DatasetDir):
            root = root.uri
        s = os.fspath(root)
        storage.scheme_of(s)  # unknown or mangled scheme: StorageError now, not a local folder later
        self.uri: str = s.rstrip("/") if not storage.is_local(s) else str(storage.local_path(s))
        self.is_local = storage.is_local(s)
        self._listing: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"DatasetDir({self.uri!r})"

    def __getstate__(self) -> dict:  # ship the location only, never a cached listing, to workers
        return {"uri": self.uri, "is_local": self.is_local, "_listing": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- locations ------------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        if not self.is_local:
            raise StorageError(
                f"{self.uri} is on an object store: this code path still assumes a local folder "
                "(use DatasetDir.uri / join() and pipeline.storage)"
            )
        return Path(self.uri)

    def join(self, name: str) -> str:
        return storage.join(self.uri, name)

    def _loc(self, name: str) -> Path | str:
        return Path(self.uri) / name if self.is_local else self.join(name)

    def parquet(self, shard_id: str) -> Path | str:
        """The shard's parquet: a Path for local directories, a URI string on object stores."""
        return self._loc(shard_name(shard_id))

    def stats_path(self, shard_id: str) -> Path | str:
        return self._loc(f"part-{shard_id}.stats.json")

    def marker(self, shard_id: str) -> Path | str:
        return self._loc(f"part-{shard_id}.done")

    # -- one listing ----------------------------------------------------------------------------------------
    def listing(self, refresh: bool = False) -> dict[str, int]:
        """name -> size of every object directly in the directory (one request, cached until `refresh`)."""
        if self._listing is None or refresh:
            self._listing = storage.list_dir(self.uri)
        return self._listing

    def refresh(self) -> DatasetDir:
        self._listing = None
        return self

    def _note(self, name: str, size: int | None) -> None:
        """Keep a cached listing true to this process's own writes (size None = deleted)."""
        if self._listing is not None:
            if size is None:
                self._listing.pop(name, None)
            else:
                self._listing[name] = size

    def shard_ids(self) -> list[str]:
        """Every shard id with a parquet present (finished or not), sorted."""
        return sorted(m.group(1) for n in self.listing() if (m := SHARD_RE.match(n)))

    def is_done(self, shard_id: str) -> bool:
        names = self.listing()
        return f"part-{shard_id}.done" in names and shard_name(shard_id) in names

    def done_ids(self) -> list[str]:
        names = self.listing()
        return [s for s in self.shard_ids() if f"part-{s}.done" in names]

    def complete(self) -> bool:
        """True when the directory has a roll-up (every shard of its run finished)."""
        return ROLLUP in self.listing(refresh=True)

    def fingerprint(self) -> str:
        """A short hash of the finished shards' names and sizes (for a later stage's config guard)."""
        names = self.listing()
        items = [(n, names[n]) for s in self.done_ids() for n in (shard_name(s), f"part-{s}.done")]
        return storage.sha256_bytes(json.dumps(items).encode())[:16]

    # -- reading ----------------------------------------------------------------------------------------------
    def read_shard(self, shard_id: str, columns: list[str] | None = None, filters: Any = None,
                   verify: bool = False) -> pa.Table:
        """A shard's rows. `verify`: read the whole object once and check it against the marker."""
        uri = self.join(shard_name(shard_id))
        if not verify:
            return storage.read_parquet(uri, columns=columns, filters=filters)
        data = storage.get_bytes(uri)
        info = self.read_marker(shard_id)
        if info.get("bytes") not in (None, len(data)) or (
            info.get("sha256") and storage.sha256_bytes(data) != info["sha256"]
        ):
            raise ShardCorrupt(
                f"{uri} differs from its marker (size or sha256): it was changed after it was committed; "
                "re-run the stage that wrote it with --overwrite"
            )
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(data), columns=columns, filters=filters)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for sid in self.done_ids():
            yield sid, self.read_shard(sid, columns)

    def num_rows(self, shard_id: str) -> int:
        return storage.parquet_file(self.join(shard_name(shard_id))).metadata.num_rows

    def read_marker(self, shard_id: str) -> dict:
        try:
            return storage.get_json(self.join(f"part-{shard_id}.done"))
        except StorageError as exc:
            raise StorageError(f"shard {shard_id} of {self.uri} has no readable marker: {exc}") from None

    def shard_stats(self, shard_id: str) -> dict:
        return storage.get_json(self.join(f"part-{shard_id}.stats.json"))

    def read_json(self, name: str) -> Any:
        return storage.get_json(self.join(name))

    def has(self, name: str, refresh: bool = False) -> bool:
        return name in self.listing(refresh=refresh)

    # -- writing (the executors' job; stages never call these) -------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        data = storage.json_bytes(obj)
        storage.put_bytes(self.join(name), data)
        self._note(name, len(data))

    def put(self, name: str, data: bytes | Path) -> tuple[int, str]:
        """Publish one object in the directory (bytes, or a finished local file); returns (size, sha256)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            blob = bytes(data)
            storage.put_bytes(self.join(name), blob)
            size, digest = len(blob), storage.sha256_bytes(blob)
        else:
            digest = storage.sha256_of(data)
            size = Path(data).stat().st_size
            storage.put_file(self.join(name), data)
        self._note(name, size)
        return size, digest

    def delete(self, names: list[str]) -> None:
        storage.delete_many([self.join(n) for n in names])
        for n in names:
            self._note(n, None)

    def commit_shard(self, shard_id: str, table: pa.Table, stats: dict,
                     files: Mapping[str, bytes | Path] | None = None, had_marker: bool | None = None,
                     keep_files: Mapping[str, dict] | None = None) -> dict:
        """The contract's write order: extra objects, parquet, stats, marker last (each atomic).

        `keep_files`: marker entries ({"bytes", "sha256"}) of extra objects an earlier commit of this shard
        published and that stay as they are (a shard re-committed with only some of its objects rewritten).

        An existing marker is removed first, so a kill mid-commit never leaves an old marker vouching for
        new bytes. Whether one exists comes from `had_marker` (the driver's listing, passed by executors
        to their workers), else from this object's cached listing, else it is deleted blindly. Returns the
        marker.
        """
        check_shard_id(shard_id)
        marker_name = f"part-{shard_id}.done"
        if had_marker is None:
            had_marker = self._listing is None or marker_name in self._listing
        if had_marker:
            storage.delete(self.join(marker_name))
            self._note(marker_name, None)
        extra = {k: dict(v) for k, v in sorted((keep_files or {}).items()) if k not in (files or {})}
        for name, data in sorted((files or {}).items()):
            _check_extra_name(name)
            size, digest = self.put(name, data)
            extra[name] = {"bytes": size, "sha256": digest}
        blob = storage.write_parquet_bytes(table)
        storage.put_bytes(self.join(shard_name(shard_id)), blob)
        self._note(shard_name(shard_id), len(blob))
        self.write_json(f"part-{shard_id}.stats.json", stats)
        marker: dict[str, Any] = {"rows": table.num_rows, "bytes": len(blob), "sha256": storage.sha256_bytes(blob)}
        if extra:
            marker["files"] = dict(sorted(extra.items()))
        self.write_json(marker_name, marker)
        return marker

    def clean_temporaries(self) -> int:
        """Remove half-written temporaries left by a killed local run (object stores never have any)."""
        if not self.is_local:
            return 0
        tmps = [n for n in self.listing(refresh=True) if n.startswith(".") and n.endswith(".tmp")]
        self.delete(tmps)
        return len(tmps)


def _check_extra_name(name: str) -> None:
    if not name or "/" in name or name.startswith((".", "_", "part-")) or name == ROLLUP:
        raise ValueError(f"extra object name {name!r} must be a plain file name, not hidden, '_'- or 'part-'-prefixed")


class OutputClaimError(ValueError):
    pass


def claim_output(root: Uri | DatasetDir, meta: dict, overwrite: bool) -> bool:
    """Record in `root/_stage.json` which stage and config own this output directory.

    Returns True when an earlier run with a different `meta` owned it (the caller then discards that
    run's results); raises OutputClaimError with what to do when that happens without `overwrite`, so two
    configs never mix in one directory. Used by the executors (and, until it is ported, the bundle).
    """
    d = root if isinstance(root, DatasetDir) else DatasetDir(root)
    storage.makedirs(d.uri)
    changed = False
    if d.has(STAGE_META):
        old = d.read_json(STAGE_META)
        if old == meta:
            return False
        if not overwrite:
            raise OutputClaimError(
                f"{d.uri} holds output of {old}, but this run is {meta}: use a new output directory, "
                "or pass overwrite=True (--overwrite) to redo it"
            )
        changed = True
    d.write_json(STAGE_META, meta)
    return changed
