"""Deterministic tar writing with member offsets, and tar reading for verify/remove.

`tarfile` is used directly rather than `webdataset.TarWriter` for two reasons: the index needs each
member's header and data offsets, which TarWriter does not expose; and every header field that could vary
between runs (mtime, uid, gid, uname, gname, mode, format) is fixed here, so the same samples give
byte-identical shards on every machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FIXED_MTIME = 0
FIXED_MODE = 0o444
TAR_FORMAT = tarfile.USTAR_FORMAT  # plain 512-byte headers; every reader understands them


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # header start
    data_offset: int
    size: int
    sha256: str


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = FIXED_MTIME
    ti.mode = FIXED_MODE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class ShardWriter:
    """Write samples (contiguous members) to a file object; `add` returns each member's offsets."""

    def __init__(self, fileobj: BinaryIO):
        self._tf = tarfile.open(fileobj=fileobj, mode="w", format=TAR_FORMAT)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> list[Member]:
        out = []
        for ext, data in members:
            ti = _info(f"{key}.{ext}", len(data))
            header_at = self._tf.offset
            self._tf.addfile(ti, io.BytesIO(data))
            # addfile works on a copy of `ti`; the data is the last ceil(size/512) blocks written.
            data_at = self._tf.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            out.append(Member(ti.name, header_at, data_at, len(data), hashlib.sha256(data).hexdigest()))
        return out

    @property
    def offset(self) -> int:
        return self._tf.offset

    def close(self) -> None:
        self._tf.close()


def write_shard_atomic(path: Path, fill) -> object:
    """Create `path` through a temporary file in the same folder; `fill(writer)` adds the samples and its
    return value is passed back. The file appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            writer = ShardWriter(fh)
            result = fill(writer)
            writer.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are meant to be read by others (training, serving)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def split_member_name(name: str) -> tuple[str, str]:
    """`abc_0.face.npy` -> ("abc_0", "face.npy"): keys hold no dots, so the first dot ends the key."""
    key, _, ext = name.partition(".")
    return key, ext


def iter_members(path: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Every member of a shard with its bytes, in file order. Raises tarfile.TarError / EOFError on damage."""
    with tarfile.open(path, mode="r:") as tf:
        for ti in tf:
            fh = tf.extractfile(ti) if ti.isfile() else None
            data = fh.read() if fh is not None else b""
            if ti.isfile() and len(data) != ti.size:
                raise tarfile.ReadError(f"member {ti.name} is truncated ({len(data)} of {ti.size} bytes)")
            yield ti, data


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)
