"""Output writers: the format of the bundle's shard files, behind one interface and a registry.

A writer says how to write a shard (`sink`), how to list and read the members of a shard (`iter_members`,
`read_member`) and how to rewrite a shard without some samples (`rewrite`); the pack tasks, `verify`,
`remove` and `report` go through it and never parse a shard format themselves. A shard is one file (the
executor commits it with its window), a sample is a key with members (`jpg`, `json`, `face.npy`) stored
contiguously, and each member's bytes lie raw at a byte offset of the file, which `index.parquet` records
(`offset`/`end` of the sample, `<ext>_offset`/`<ext>_size` of each member): any such container can be a
writer (tar, zip stored, ...).

Writers register the way stages and embedders do (`register_writer`, like timm's models):

    @register_writer("webdataset")          # pipeline/bundle/tarpack.py, the default
    class WebDatasetWriter(OutputWriter): extension = "tar"; ...

A writer of your own lives in its own module, named in the config's `plugins`, and is chosen with
`bundle.writer: <name>` (tests/toy_writer.py is one). The bundle's `stats.json` records the writer's name and
module, so `verify`, `report` and `remove` find it again without the config.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NamedTuple, Protocol

from pipeline.stage import StageError

DEFAULT_WRITER = "webdataset"
MEMBER_COLUMNS = {"jpg": "jpg", "json": "json", "face.npy": "npy"}  # member extension -> index column prefix


class Member(NamedTuple):  # a NamedTuple: built three times per sample, it must be cheap
    """Where a written member lies in its shard file."""

    name: str
    offset: int  # where the member's entry (header) starts
    data_offset: int  # where its raw bytes start
    size: int
    sha256: str


class StoredMember(NamedTuple):
    """A member read back from a shard file, in file order."""

    key: str
    ext: str
    data: bytes
    data_offset: int
    size: int  # the size the shard's own metadata declares (a truncated member reads fewer bytes)


class ShardReadError(ValueError):
    """A shard file does not parse (damaged, truncated)."""


class ShardSink(Protocol):
    """Writes one shard's samples to a binary file object, in order."""

    @property
    def offset(self) -> int: ...  # bytes written so far (after `close`: the shard's size)

    def add(self, key: str, members: list[tuple[str, bytes]] | list[tuple[str, bytes, str]]) -> list[Member]: ...

    def close(self) -> None: ...


class OutputWriter:
    """The base of every output writer. Subclasses set `extension` and implement `sink` and `iter_members`."""

    name: ClassVar[str] = ""
    module: ClassVar[str] = ""
    extension: ClassVar[str] = ""  # shard files are webbody-{split}-{n:06d}.{extension}
    file_kind: ClassVar[str] = ""  # what problems call a shard ("tar"); the extension when empty

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "module": self.module}

    def shard_name(self, split: str, n: int) -> str:
        return f"webbody-{split}-{n:06d}.{self.extension}"

    def is_shard(self, name: str) -> bool:
        return re.fullmatch(rf"webbody-(train|test)-\d{{6}}\.{re.escape(self.extension)}", name) is not None

    @property
    def kind(self) -> str:
        return self.file_kind or self.extension

    # -- to implement -------------------------------------------------------------------------------------------
    def sink(self, fh: BinaryIO) -> ShardSink:
        raise NotImplementedError

    def iter_members(self, path: Path) -> Iterator[StoredMember]:
        """Every member of a local shard file, in file order; ShardReadError when it does not parse."""
        raise NotImplementedError

    # -- with defaults that hold for any writer whose members lie raw at their index offsets --------------------
    def read_member(self, store: Any, row: dict, ext: str) -> bytes:
        """One member's bytes from a shard on any storage (`store`: pipeline.bundle.store.Store), by the index
        row's offsets: one ranged read, no scan of the shard."""
        col = MEMBER_COLUMNS[ext]
        return store.read_range(row["shard"], row[f"{col}_offset"], row[f"{col}_size"])

    def rewrite(self, src: Path, dst: Path, kept_rows: list[dict]) -> list[dict]:
        """Write `dst` as `src` with only the samples of `kept_rows` (index rows, in their new order), members
        copied byte for byte; returns the rows with their new positions and offsets."""
        keep = {r["key"] for r in kept_rows}
        members: dict[str, list[tuple[str, bytes]]] = {}
        for m in self.iter_members(src):
            if m.key in keep:
                members.setdefault(m.key, []).append((m.ext, m.data))
        rows = []
        with open(dst, "wb") as fh:
            sink = self.sink(fh)
            for pos, r in enumerate(kept_rows):
                placed = sink.add(r["key"], members[r["key"]])
                rows.append({**r, "position": pos, **locations(placed, sink.offset)})
            sink.close()
        return rows


def locations(placed: list[Member], end: int) -> dict[str, Any]:
    """The index columns that say where a sample's members lie (offsets, sizes, sha256), from what a sink
    returned for it; `end` = the sink's offset after the sample."""
    by_ext = {m.name.partition(".")[2]: m for m in placed}
    out: dict[str, Any] = {"offset": placed[0].offset, "end": end}
    for ext, col in MEMBER_COLUMNS.items():
        m = by_ext.get(ext)
        out[f"{col}_offset"] = m.data_offset if m else None
        out[f"{col}_size"] = m.size if m else None
        out["member_sha256" if ext == "jpg" else f"{col}_sha256"] = m.sha256 if m else None
    return out


_WRITERS: dict[str, type[OutputWriter]] = {}


def register_writer(name: str, replace: bool = False):
    """Class decorator: make an `OutputWriter` subclass available as `bundle.writer: <name>`."""

    def deco(cls: type[OutputWriter]) -> type[OutputWriter]:
        if not (isinstance(cls, type) and issubclass(cls, OutputWriter)):
            raise StageError(f"writer '{name}': {cls!r} is not an OutputWriter subclass")
        if not cls.extension or not re.fullmatch(r"[A-Za-z0-9]+", cls.extension):
            raise StageError(f"writer '{name}': `extension` must be a plain word (got {cls.extension!r})")
        old = _WRITERS.get(name)
        if old is not None and not replace and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise StageError(f"output writer '{name}' is already registered by {old.__module__}")
        cls.name, cls.module = name, cls.__module__
        _WRITERS[name] = cls
        return cls

    return deco


def unregister_writer(name: str) -> None:
    """Remove a user writer (tests, notebooks); the built-in one stays."""
    if name in BUILTIN_WRITERS:
        raise StageError(f"writer '{name}' is built in and cannot be removed")
    _WRITERS.pop(name, None)


# Built-in writers, by module (imported on first use, as pipeline/registry.py names stage modules): the
# writer modules import this one, never the other way round.
BUILTIN_WRITERS = {DEFAULT_WRITER: "pipeline.bundle.tarpack"}


def _builtins() -> None:
    for module in BUILTIN_WRITERS.values():
        importlib.import_module(module)


def writer_names() -> list[str]:
    _builtins()
    return sorted(_WRITERS)


def get_writer(name: str = DEFAULT_WRITER, module: str | None = None) -> OutputWriter:
    """The registered writer `name`; `module` (recorded in a bundle's stats.json) is imported if needed."""
    _builtins()
    if name not in _WRITERS and module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise StageError(f"output writer '{name}' comes from module '{module}', which does not import: {exc}") from exc
    if name not in _WRITERS:
        raise StageError(f"unknown output writer '{name}' (bundle.writer): registered are {', '.join(sorted(_WRITERS))}; "
                         "a writer of your own is registered by a module named in the config's `plugins`")
    return _WRITERS[name]()


def writer_of(stats: dict | None) -> OutputWriter:
    """The writer a finished bundle was written with (its stats.json; bundles before the registry: webdataset)."""
    info = (stats or {}).get("writer") or {}
    return get_writer(info.get("name", DEFAULT_WRITER), info.get("module"))
