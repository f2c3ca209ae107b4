"""A folder on any fsspec filesystem (local path, `s3://`, `gs://`, `memory://`): what the bundle reads and writes.

Small on purpose: one listing per folder (names and sizes), whole-object reads, and atomic writes. On a local
disk an atomic write is a temporary file in the same folder, fsync, rename; on an object store it is a local
spool file uploaded with one `put_file` (a PUT, or a multipart upload that becomes visible only when complete),
so a reader sees the whole object or none. There is no rename on object stores, so the bundle writes each
shard's marker last.

Credentials and endpoints come the standard way (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, ...), read
by s3fs/botocore itself; nothing here takes or logs them. This module is the one place the bundle touches a
filesystem; it resolves URIs through the engine's `pipeline.storage` (same file-system instances and rules).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fsspec.implementations.local import LocalFileSystem


def _split_url(root: str) -> tuple[Any, str]:
    """The engine's resolution (`pipeline.storage`): its file-system instances (no stale listing caches),
    its refusal of unknown schemes, of credentials in URIs and of Path-mangled `s3:/` locations."""
    from pipeline import storage

    fs, path = storage.resolve(root)
    return (LocalFileSystem(), path) if fs is None else (fs, path)


class Store:
    """A folder `root` (URI or path). `fs` may be given (e.g. a wrapped filesystem that counts calls)."""

    def __init__(self, root: str | os.PathLike, fs: Any = None):
        root = os.fspath(root)
        if fs is None:
            fs, path = _split_url(root)
        else:
            path = fs._strip_protocol(root) if hasattr(fs, "_strip_protocol") else root
        self.fs = fs
        self.path = str(path).rstrip("/") or "/"
        self.uri = root.rstrip("/") if "://" in root else self.path
        self.local = isinstance(getattr(fs, "wrapped", fs), LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # -- names ------------------------------------------------------------------------------------------------
    def join(self, name: str) -> str:
        return posixpath.join(self.path, name) if not self.local else os.path.join(self.path, name)

    def url(self, name: str) -> str:
        """A URL readers (webdataset, fsspec.open) can open for `name`."""
        return f"{self.uri}/{name}" if "://" in self.uri else os.path.join(self.path, name)

    def child(self, name: str) -> Store:
        return Store(self.url(name), fs=self.fs)

    def parent(self) -> Store:
        if "://" in self.uri:
            scheme, rest = self.uri.split("://", 1)
            return Store(f"{scheme}://{posixpath.dirname(rest)}", fs=self.fs)
        return Store(os.path.dirname(self.path), fs=self.fs)

    # -- reading ----------------------------------------------------------------------------------------------
    def listing(self, sub: str = "") -> dict[str, int]:
        """{file name: size} of the folder (or its subfolder `sub`): one listing call; {} when absent."""
        from pipeline.storage import _ls_one_request

        where = self.join(sub) if sub else self.path
        try:
            entries = _ls_one_request(self.fs, where)  # s3fs: no second listing of the parent when empty
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            if e.get("type") == "file":
                out[posixpath.basename(e["name"].rstrip("/"))] = int(e.get("size") or 0)
        return out

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.join(name))

    def read_json(self, name: str) -> Any:
        """A small JSON object (a marker, stats): one GET (s3fs otherwise asks the size first)."""
        if hasattr(self.fs, "max_concurrency"):
            return json.loads(self.fs.cat_file(self.join(name), max_concurrency=1))
        return json.loads(self.read_bytes(name))

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` (one ranged GET on object stores)."""
        return self.fs.cat_file(self.join(name), start=offset, end=offset + size)

    def open(self, name: str) -> IO[bytes]:
        return self.fs.open(self.join(name), "rb")

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.join(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.join(name)))

    # -- writing ----------------------------------------------------------------------------------------------
    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.join(name))

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[IO[bytes]]:
        """A binary file to write `name` into; it appears whole when the block exits, or not at all."""
        target = self.join(name)
        if self.local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
        else:
            fd, tmp = tempfile.mkstemp(prefix="webbody-put-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            if self.local:
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are meant to be read by others
                os.replace(tmp, target)
            else:
                self.fs.put_file(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as fh:
            fh.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_parquet(self, name: str, table: Any) -> None:
        import pyarrow.parquet as pq

        with self.atomic_writer(name) as fh:
            # The same fixed writer options as pipeline.shards: same rows -> byte-identical file.
            pq.write_table(table, fh, compression="zstd", use_dictionary=True, write_statistics=True)


@contextlib.contextmanager
def local_folder(root: str | os.PathLike | Store) -> Iterator[Path]:
    """The folder as a local path: itself when local, else a temporary download of its objects (for tools
    that read every byte anyway, like `verify`)."""
    store = as_store(root)
    if store.local:
        yield Path(store.path)
        return
    with tempfile.TemporaryDirectory(prefix="webbody-mirror-") as tmp:
        for name in store.listing():
            store.fs.get_file(store.join(name), str(Path(tmp) / name))
        yield Path(tmp)


def as_store(x: str | os.PathLike | Store) -> Store:
    return x if isinstance(x, Store) else Store(x)


class CountingFS:
    """Wraps an fsspec filesystem and counts calls by method name (benchmarks and tests of request counts)."""

    COUNTED = ("ls", "cat_file", "open", "exists", "info", "size", "put_file", "rm_file", "isdir", "isfile", "glob",
               "find")

    def __init__(self, fs: Any):
        self.wrapped = fs
        self.calls: dict[str, int] = {}
        self.paths: list[tuple[str, str]] = []

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.wrapped, attr)
        if attr in self.COUNTED and callable(value):
            def counted(path, *a, **k):
                self.calls[attr] = self.calls.get(attr, 0) + 1
                self.paths.append((attr, str(path)))
                return value(path, *a, **k)
            return counted
        return value
