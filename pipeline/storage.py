"""One place for storage locations: local paths, `file://`, `s3://`, `gs://` and `memory://` URIs.

Every stage reads and writes through these functions, so a build directory may be a local folder or a
prefix in an object store, and the rules of the stage contract (pipeline/shards.py) hold on both:

- `put_bytes(uri, data)` is atomic. Local: a temporary file in the same folder, fsync, `os.replace`.
  Object store: one PUT (an object appears whole or not at all; there is no rename to rely on).
- `list_dir(uri)` is ONE listing request (name -> size), so a stage finds its finished shards with one
  call, not one stat per shard.
- `open_read(uri)` gives a seekable binary file (parquet footers, tar members); `read_parquet` and
  `write_parquet_bytes` do parquet through the same file system, with fixed writer options.

Credentials and endpoints come only the standard way: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `AWS_PROFILE` and `~/.aws/*` (read by botocore inside
s3fs); `GOOGLE_APPLICATION_CREDENTIALS` for gcsfs. Never from configs, never in a URI (a URI with
`user:secret@` is refused without being echoed), never logged.

An unknown scheme is a `StorageError`, never a local folder (pathlib turns `s3://b/x` into the relative
path `s3:/b/x`; such a mangled URI is refused too). `register_scheme` adds another fsspec file system
(say `az://` through adlfs) or wraps one (tests count requests that way).

Why fsspec and not pyarrow.fs alone: s3fs/gcsfs are the file systems Ray Data, webdataset and img2dataset
already take, so one object serves all of them; pyarrow reads and writes parquet through it
(`filesystem=`). Why not a pathlib-like wrapper (universal_pathlib): a dependency for a dozen calls, and
it hides which calls are requests. Local paths bypass fsspec entirely (os calls, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage import StageError
from schemas.base import old_column_names, upgrade_table

Uri = str | os.PathLike

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_MANGLED = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]{1,}):/(?!/)")  # `s3:/bucket` (pathlib ate a slash)


class StorageError(StageError):
    """A storage location is wrong (unknown scheme, missing package, credentials in a URI, missing object)."""


# -- file systems ------------------------------------------------------------------------------------------


def _s3() -> Any:
    import s3fs

    # No listing cache: workers in other processes add objects all the time; a stale cached listing would
    # make finished shards look unfinished (or the reverse). Endpoint/credentials: botocore's own chain.
    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)


def _gcs() -> Any:
    try:
        import gcsfs
    except ImportError:
        raise StorageError("gs:// locations need the gcsfs package: pip install gcsfs") from None
    return gcsfs.GCSFileSystem(use_listings_cache=False, skip_instance_cache=True)


def _memory() -> Any:
    from fsspec.implementations.memory import MemoryFileSystem

    return MemoryFileSystem()  # process-wide: for tests and single-process runs only


# scheme -> factory of an fsspec file system. `register_scheme` adds or replaces entries.
_FACTORIES: dict[str, Callable[[], Any]] = {"s3": _s3, "gs": _gcs, "gcs": _gcs, "memory": _memory}
_INSTANCES: dict[str, Any] = {}


def register_scheme(scheme: str, factory: Callable[[], Any]) -> None:
    """Use `factory()` (an fsspec file system) for `scheme://` URIs in this process (replaces any earlier)."""
    _FACTORIES[scheme] = factory
    _INSTANCES.pop(scheme, None)


def reset_filesystems() -> None:
    """Forget cached file-system instances (after changing credentials or the endpoint in the environment)."""
    _INSTANCES.clear()


def scheme_of(uri: Uri) -> str:
    """`"s3"`, `"memory"`, ... or `"file"` for local paths (and `file://`)."""
    s = os.fspath(uri)
    m = _SCHEME.match(s)
    if m:
        return m.group(1).lower()
    if _MANGLED.match(s) and not os.path.exists(s.split("/", 1)[0]):
        scheme = _MANGLED.match(s).group(1)
        raise StorageError(
            f"'{s}' looks like a '{scheme}://' URI that lost a slash (pathlib.Path collapses '//'): "
            "pass storage locations as strings, not Path objects"
        )
    return "file"


def is_local(uri: Uri) -> bool:
    return scheme_of(uri) == "file"


def local_path(uri: Uri) -> Path:
    """The local path of a local location (`file://` stripped); StorageError for object stores."""
    s = os.fspath(uri)
    if not is_local(s):
        raise StorageError(f"{s} is not a local path (this operation needs a local folder)")
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def _check_no_credentials(s: str) -> None:
    rest = s.split("://", 1)[1]
    netloc = rest.split("/", 1)[0]
    if "@" in netloc:
        raise StorageError(
            f"a {scheme_of(s)}:// location carries credentials in its URI (refused, not shown): give the bucket "
            "only, and credentials through AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or the Prefect block"
        )


def filesystem(scheme: str) -> Any:
    """The fsspec file system for an object-store scheme (one instance per process and scheme)."""
    if scheme not in _INSTANCES:
        factory = _FACTORIES.get(scheme)
        if factory is None:
            known = ", ".join(sorted(_FACTORIES))
            raise StorageError(
                f"unknown storage scheme '{scheme}://': use a local path, file://, or one of {known} "
                "(pipeline.storage.register_scheme adds others)"
            )
        _INSTANCES[scheme] = factory()
    return _INSTANCES[scheme]


def resolve(uri: Uri) -> tuple[Any | None, str]:
    """`(fs, path)`: fs is None for local paths (plain os calls), else an fsspec file system and its path."""
    s = os.fspath(uri)
    scheme = scheme_of(s)
    if scheme == "file":
        return None, str(local_path(s))
    _check_no_credentials(s)
    fs = filesystem(scheme)
    path = s.split("://", 1)[1].rstrip("/")
    if scheme == "memory":
        path = "/" + path.lstrip("/")
    return fs, path


def join(uri: Uri, *parts: str) -> str:
    """`uri/part/part` for paths and URIs alike (no normalisation beyond one '/' between parts)."""
    s = os.fspath(uri)
    if is_local(s):
        return str(local_path(s).joinpath(*parts))
    return "/".join([s.rstrip("/"), *(p.strip("/") for p in parts)])


def display(uri: Uri) -> str:
    """A location for messages and logs (URIs never carry credentials: those are refused)."""
    return os.fspath(uri)


# -- objects -------------------------------------------------------------------------------------------------


def put_bytes(uri: Uri, data: bytes) -> None:
    """Write `data` atomically: readers see the old object, nothing, or all of `data`."""
    fs, path = resolve(uri)
    if fs is None:
        with _local_atomic(Path(path)) as fh:
            fh.write(data)
    else:
        fs.pipe_file(path, bytes(data))


@contextmanager
def _local_atomic(path: Path) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file in its folder: the block writes it, then fsync and rename onto
    `path` when the block exits cleanly; the temporary is removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_file(uri: Uri, local_file: Uri) -> None:
    """Publish a finished local file at `uri` (atomic like put_bytes; large files are not held in memory)."""
    fs, path = resolve(uri)
    src = Path(os.fspath(local_file))
    if fs is None:
        with _local_atomic(Path(path)) as fo, open(src, "rb") as fi:
            shutil.copyfileobj(fi, fo, 1 << 22)
    else:
        fs.put_file(str(src), path)  # s3fs: one PUT, or a multipart upload that appears only when complete


def get_bytes(uri: Uri, small: bool = False) -> bytes:
    """An object's bytes. `small` (markers, stats): one GET, without the size request that s3fs otherwise
    makes first to decide whether to fetch in concurrent ranges."""
    fs, path = resolve(uri)
    try:
        if fs is None:
            return Path(path).read_bytes()
        if small and hasattr(fs, "max_concurrency"):
            return fs.cat_file(path, max_concurrency=1)
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{display(uri)} not found") from None


def put_json(uri: Uri, obj: Any) -> None:
    put_bytes(uri, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """The one JSON encoding of stats and markers: sorted keys, indented, newline-terminated."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def get_json(uri: Uri) -> Any:
    data = get_bytes(uri, small=True)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{display(uri)} is not valid JSON: {exc}") from None


def open_read(uri: Uri) -> IO[bytes]:
    """A seekable binary file (use as a context manager)."""
    fs, path = resolve(uri)
    try:
        if fs is None:
            return open(path, "rb")
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise StorageError(f"{display(uri)} not found") from None


@contextmanager
def open_write(uri: Uri) -> Iterator[IO[bytes]]:
    """Stream a large object (a tar shard) to `uri`; it becomes visible only when the block exits cleanly.

    Local: a temporary file renamed into place after fsync. Object store: fsspec's buffered upload
    (multipart on S3), which creates the object only when the upload completes; an exception aborts it.
    """
    fs, path = resolve(uri)
    if fs is None:
        with _local_atomic(Path(path)) as fh:
            yield fh
    else:
        fh = fs.open(path, "wb")
        try:
            yield fh
        except BaseException:
            _abort(fh)
            raise
        fh.close()


def _abort(fh: Any) -> None:
    discard = getattr(fh, "discard", None)  # fsspec AbstractBufferedFile: drop the buffer, abort multipart
    if callable(discard):
        try:
            discard()
        except Exception:  # noqa: BLE001 (best effort: the object was never completed)
            pass


def exists(uri: Uri) -> bool:
    fs, path = resolve(uri)
    return Path(path).exists() if fs is None else bool(fs.exists(path))


def size(uri: Uri) -> int:
    fs, path = resolve(uri)
    try:
        return Path(path).stat().st_size if fs is None else int(fs.size(path))
    except FileNotFoundError:
        raise StorageError(f"{display(uri)} not found") from None


def list_dir(uri: Uri) -> dict[str, int]:
    """Files directly under `uri` (hidden ones included) -> size in bytes, in ONE listing request.

    A folder or prefix that does not exist lists as empty.
    """
    fs, path = resolve(uri)
    if fs is None:
        out: dict[str, int] = {}
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.is_file():
                        try:
                            out[e.name] = e.stat().st_size
                        except FileNotFoundError:  # removed between listing and stat (a temporary)
                            pass
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return out
    try:
        entries = _ls_one_request(fs, path)
    except FileNotFoundError:
        return {}
    prefix = path.rstrip("/") + "/"
    result = {}
    for e in entries:
        name = str(e["name"])
        if e.get("type") != "file":
            continue
        name = name[len(prefix):] if name.startswith(prefix) else name.rsplit("/", 1)[-1]
        if name and "/" not in name:
            result[name] = int(e.get("size") or 0)
    return result


def _ls_one_request(fs: Any, path: str) -> list[dict]:
    """`fs.ls(path, detail=True)` in one request. s3fs's `ls` of an empty or missing prefix lists the PARENT
    as well (to tell a missing folder from a file of that name): a second listing per new stage directory
    and per missing prefix, which `list_dir` never needs. So for s3fs, its one-prefix listing is called
    directly (same entries, no parent fallback); other file systems get their plain `ls`."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is not None and isinstance(fs, s3fs.S3FileSystem) and not fs.asynchronous:
        from fsspec.asyn import sync

        return sync(fs.loop, fs._lsdir, path.rstrip("/"), refresh=True)
    return fs.ls(path, detail=True)


def delete(uri: Uri, missing_ok: bool = True) -> None:
    fs, path = resolve(uri)
    try:
        if fs is None:
            Path(path).unlink()
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise StorageError(f"{display(uri)} not found") from None


def delete_many(uris: Iterable[Uri]) -> None:
    """Delete objects (missing ones ignored); object stores batch them (S3: up to 1000 keys a request)."""
    items = [os.fspath(u) for u in uris]
    if not items:
        return
    groups: dict[str, list[str]] = {}
    for u in items:
        groups.setdefault(scheme_of(u), []).append(u)
    for scheme, group in groups.items():
        if scheme == "file":
            for u in group:
                delete(u)
            continue
        fs = filesystem(scheme)
        paths = [resolve(u)[1] for u in group]
        try:
            fs.rm(paths)
        except FileNotFoundError:
            for p in paths:
                try:
                    fs.rm_file(p)
                except FileNotFoundError:
                    pass


def makedirs(uri: Uri) -> None:
    """Create a local folder (object stores have no folders: a no-op there)."""
    fs, path = resolve(uri)
    if fs is None:
        Path(path).mkdir(parents=True, exist_ok=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(uri: Uri) -> str:
    h = hashlib.sha256()
    with open_read(uri) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- parquet -------------------------------------------------------------------------------------------------

# Fixed writer options and no timestamps in metadata: the same rows give byte-identical files everywhere.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "zstd", "use_dictionary": True, "write_statistics": True}


def write_parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """A table as parquet bytes with the project's fixed options (then `put_bytes` commits it atomically)."""
    sink = io.BytesIO()
    pq.write_table(table, sink, **{**PARQUET_OPTIONS, **options})
    return sink.getvalue()


def write_parquet(uri: Uri, table: pa.Table, **options: Any) -> bytes:
    """Write a table atomically; returns the bytes written (for a marker's size and hash)."""
    data = write_parquet_bytes(table, **options)
    put_bytes(uri, data)
    return data


def read_parquet(uri: Uri, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """A stored table with today's column names (`schemas.base.upgrade_table`: old rename-only versions)."""
    fs, path = resolve(uri)

    def read(cols: list[str] | None) -> pa.Table:
        if fs is None:
            return pq.read_table(path, columns=cols, filters=filters)
        return pq.read_table(path, columns=cols, filters=filters, filesystem=fs)

    try:
        try:
            return upgrade_table(read(columns))
        except pa.ArrowInvalid:
            # A file of an older schema version may name a requested column differently: read its footer
            # (only on this failure path, so today's files cost no extra request) and ask for the old names.
            old = old_column_names(pq.read_schema(path, filesystem=fs), columns) if columns else columns
            if old == columns:
                raise
            return upgrade_table(read(old))
    except FileNotFoundError:
        raise StorageError(f"{display(uri)} not found") from None


def parquet_file(uri: Uri) -> pq.ParquetFile:
    """A `ParquetFile` for metadata and row-group reads (it keeps its file open until garbage-collected)."""
    fs, path = resolve(uri)
    try:
        return pq.ParquetFile(path if fs is None else fs.open(path, "rb"))
    except FileNotFoundError:
        raise StorageError(f"{display(uri)} not found") from None


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    if columns:
        columns = old_column_names(pq.read_schema(pa.BufferReader(data)), columns)
    return upgrade_table(pq.read_table(pa.BufferReader(data), columns=columns))
