"""An output writer added from outside the package: this file and its decorator are all it takes (named in a
config's `plugins`, chosen with `bundle.writer: zip`; tests/test_bundle_writers.py). "zip": each shard is a ZIP
archive with stored (uncompressed) entries `<key>.<ext>`, readable by any unzip tool; a member's bytes lie raw
in the file, so the index's offsets and ranged reads work as for tar shards. Not meant for training (the
training loader reads WebDataset tars): it shows the seam."""

from __future__ import annotations

import hashlib
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.bundle.writers import Member, OutputWriter, ShardReadError, StoredMember, register_writer

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest ZIP time: the same bytes on every run
LOCAL_HEADER = 30  # bytes of a ZIP local file header before its name and extra field


class _Counting:
    """A write-only stream that counts bytes (zipfile then writes data descriptors instead of seeking back)."""

    def __init__(self, fh: BinaryIO):
        self._fh, self.pos = fh, 0

    def write(self, data: bytes) -> int:
        self._fh.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


class ZipSink:
    def __init__(self, fh: BinaryIO):
        self._out = _Counting(fh)
        self._zip = zipfile.ZipFile(self._out, "w", compression=zipfile.ZIP_STORED)

    @property
    def offset(self) -> int:
        return self._out.pos

    def add(self, key: str, members: list[tuple[str, bytes]] | list[tuple[str, bytes, str]]) -> list[Member]:
        out = []
        for member in members:
            ext, data = member[0], member[1]
            digest = member[2] if len(member) > 2 else hashlib.sha256(data).hexdigest()
            info = zipfile.ZipInfo(f"{key}.{ext}", date_time=FIXED_TIME)
            info.create_system, info.external_attr = 3, 0o444 << 16
            start = self._out.pos
            self._zip.writestr(info, data)
            data_at = start + LOCAL_HEADER + len(info.filename.encode()) + len(info.extra)
            out.append(Member(info.filename, start, data_at, len(data), digest))
        return out

    def close(self) -> None:
        self._zip.close()


@register_writer("zip")
class ZipWriter(OutputWriter):
    extension = "zip"

    def sink(self, fh: BinaryIO) -> ZipSink:
        return ZipSink(fh)

    def iter_members(self, path: Path) -> Iterator[StoredMember]:
        try:
            with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
                for info in zf.infolist():  # central directory order = write order
                    raw.seek(info.header_offset)
                    head = raw.read(LOCAL_HEADER)
                    if len(head) < LOCAL_HEADER or head[:4] != b"PK\x03\x04":
                        raise ShardReadError(f"no local header for {info.filename}")
                    name_len, extra_len = struct.unpack("<HH", head[26:30])
                    key, _, ext = info.filename.partition(".")
                    yield StoredMember(key, ext, zf.read(info), info.header_offset + LOCAL_HEADER + name_len + extra_len,
                                       info.file_size)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise ShardReadError(str(exc)) from exc
