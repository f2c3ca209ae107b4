"""Versioned pyarrow schemas and the validator every stage runs on what it reads and writes.

A schema is registered under a table name with an integer version stored in the schema metadata, so a
shard written by an older pipeline is recognised instead of being misread: a version whose only change was
renamed columns is read through `renames` (the old names mapped to today's, see `upgrade`), any other
older or newer version is refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field

import pyarrow as pa

SCHEMA_NAME_KEY = b"webbody.table"
SCHEMA_VERSION_KEY = b"webbody.version"


class SchemaError(ValueError):
    """A table does not match its schema; the message names the table and the column."""


@dataclass(frozen=True)
class TableSchema:
    """A named, versioned pyarrow schema.

    `required` columns must be present with exactly the declared type. Extra columns are refused unless
    `allow_extra` is set (stages may carry pass-through columns such as img2dataset's `key`).
    `renames[v]` maps the column names of version `v` to those of version `v + 1`, for versions whose only
    change was a rename: tables of those versions are read as today's (`upgrade`).
    """

    name: str
    version: int
    schema: pa.Schema
    allow_extra: bool = False
    renames: Mapping[int, Mapping[str, str]] = dc_field(default_factory=dict, hash=False)

    @property
    def arrow(self) -> pa.Schema:
        return self.schema.with_metadata(
            {SCHEMA_NAME_KEY: self.name.encode(), SCHEMA_VERSION_KEY: str(self.version).encode()}
        )

    def readable_from(self, version: int) -> bool:
        """Whether a table of `version` can be read as this one (today's, or renames all the way up)."""
        return all(v in self.renames for v in range(version, self.version))

    def column_names_at(self, version: int, names: list[str]) -> list[str]:
        """Today's column `names` as version `version` called them (to read a subset of an old file)."""
        back = list(names)
        for v in range(self.version - 1, version - 1, -1):
            old_of = {new: old for old, new in self.renames.get(v, {}).items()}
            back = [old_of.get(n, n) for n in back]
        return back

    def upgrade(self, table: pa.Table, version: int) -> pa.Table:
        """`table`, written at `version`, with today's column names and version metadata."""
        names = list(table.column_names)
        for v in range(version, self.version):
            mapping = self.renames.get(v, {})
            names = [mapping.get(n, n) for n in names]
        meta = dict(table.schema.metadata or {})
        meta[SCHEMA_VERSION_KEY] = str(self.version).encode()
        return table.rename_columns(names).replace_schema_metadata(meta)

    def validate(self, table: pa.Table, where: str = "") -> pa.Table:
        """Return `table` cast to this schema (column order and metadata), or raise SchemaError."""
        loc = f" in {where}" if where else ""
        table = upgrade_table(table)
        meta = table.schema.metadata or {}
        if SCHEMA_NAME_KEY in meta:
            found_name = meta[SCHEMA_NAME_KEY].decode()
            found_version = int(meta.get(SCHEMA_VERSION_KEY, b"0"))
            if found_name != self.name:
                raise SchemaError(f"table{loc} is a '{found_name}' table, expected '{self.name}'")
            if found_version != self.version:
                raise SchemaError(
                    f"table '{self.name}'{loc} has schema version {found_version}, this code reads "
                    f"version {self.version}: re-run the stage that wrote it"
                )
        names = set(table.column_names)
        for field in self.schema:
            if field.name not in names:
                raise SchemaError(f"table '{self.name}'{loc}: missing column '{field.name}' ({field.type})")
            got = table.schema.field(field.name).type
            if got != field.type and not _safely_castable(got, field.type):
                raise SchemaError(
                    f"table '{self.name}'{loc}: column '{field.name}' has type {got}, expected {field.type}"
                )
            if not field.nullable and table.column(field.name).null_count:
                raise SchemaError(f"table '{self.name}'{loc}: column '{field.name}' has nulls but is required")
        extra = [n for n in table.column_names if n not in self.schema.names]
        if extra and not self.allow_extra:
            raise SchemaError(f"table '{self.name}'{loc}: unexpected column(s) {extra}")
        cols = [table.column(f.name).cast(f.type) for f in self.schema]
        return pa.Table.from_arrays(cols, schema=self.arrow)

    def empty(self) -> pa.Table:
        return self.arrow.empty_table()

    def from_rows(self, rows: list[dict]) -> pa.Table:
        """Build a validated table from python dicts (missing nullable keys become null)."""
        if not rows:
            return self.empty()
        cols = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in self.schema}
        return self.validate(pa.table(cols))


def _safely_castable(got: pa.DataType, want: pa.DataType) -> bool:
    # Integer widening, string/large_string and binary/large_binary differences come from writers such as
    # img2dataset and pandas; anything else is a real mismatch.
    if pa.types.is_integer(got) and pa.types.is_integer(want):
        return True
    if pa.types.is_floating(got) and pa.types.is_floating(want):
        return True
    if pa.types.is_null(got):
        return True
    pairs = {
        (pa.string(), pa.large_string()),
        (pa.large_string(), pa.string()),
        (pa.binary(), pa.large_binary()),
        (pa.large_binary(), pa.binary()),
    }
    return (got, want) in pairs


REGISTRY: dict[str, TableSchema] = {}


def table_version(table_or_schema: pa.Table | pa.Schema) -> tuple[str, int] | None:
    """(table name, version) from the schema metadata, or None for a table with no webbody metadata."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    meta = schema.metadata or {}
    if SCHEMA_NAME_KEY not in meta:
        return None
    return meta[SCHEMA_NAME_KEY].decode(), int(meta.get(SCHEMA_VERSION_KEY, b"0"))


def _older_readable(schema: pa.Schema) -> tuple[TableSchema, int] | None:
    """(today's schema, the found version) when `schema` is an older, rename-only version of a registered one."""
    found = table_version(schema)
    if found is None or found[0] not in REGISTRY:
        return None
    ts = REGISTRY[found[0]]
    return (ts, found[1]) if found[1] < ts.version and ts.readable_from(found[1]) else None


def upgrade_table(table: pa.Table) -> pa.Table:
    """A table of an older, rename-only version of a registered schema, with today's names; others as they are.

    Every reader of stored tables calls this (`TableSchema.validate` does, and so does
    `pipeline.storage.read_parquet`), so old shards resume and old bundles train without a rewrite.
    """
    older = _older_readable(table.schema)
    return table if older is None else older[0].upgrade(table, older[1])


def old_column_names(schema: pa.Schema, columns: list[str]) -> list[str]:
    """The names `columns` (today's) have in a file with `schema`, which may be an older rename-only version."""
    older = _older_readable(schema)
    return columns if older is None else older[0].column_names_at(older[1], columns)


def register(ts: TableSchema) -> TableSchema:
    if ts.name in REGISTRY and REGISTRY[ts.name] != ts:
        raise ValueError(f"schema '{ts.name}' registered twice with different definitions")
    REGISTRY[ts.name] = ts
    return ts
