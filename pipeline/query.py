"""Query stage: name queries and URL lists -> a sharded URL manifest (schemas.tables.MANIFEST).

Inputs (config `query.inputs`, any mix, read in order):
- `url_lst`: WebFace260M / WebBody `url.lst` lines `idx label URL...`; tokens after the second are re-joined
  with single spaces into the URL (URLs may contain spaces), as the official make_parquet step does.
- `table`: CSV, JSONL or parquet with a `url` column and `name` and/or `label` (or `source_label`).
- `captions`: LAION-style metadata (parquet/CSV/JSONL with `url` and `caption`) searched for a list of names:
  whole-word, case- and accent-insensitive, at most `per_name_cap` URLs per name.

Every input row ends up in the manifest or counted under a reason: `malformed_line`, `missing_field`,
`not_utf8`, `bad_url` (not http(s) with a host), `duplicate_url` (same URL twice for one identity),
`optout_name`, `optout_domain`, `name_cap`, and for captions `no_match`. Sample ids are a hash of
(source_label, url), so the same input always gives the same ids.

Shards are NAME-ALIGNED: all URLs of one source label are in one shard (names packed greedily, in order of
first appearance, into shards of at most `shard_size` rows; rows of a name keep input order). A name with more
than `shard_size` URLs gets shards of its own (consecutive ids, each holding only that name; their stats
name it under `split_label`). Later stages keep shard ids, so per-name steps can run shard by shard.

On the contract (pipeline/stage.py) the query is a `PlannedStage`: `plan()` is the global pass (duplicates
and caps are found across the whole input), reading input files in parallel as Ray tasks when Ray runs
(one task per file, merged in file order, so the result does not depend on it); each unit is one manifest
shard, committed by the executor. The plan is held by the stage object in the driver, so the query runs on
the in-process executor. A re-run with the same config and inputs on a finished output returns its stats
without reading the inputs again; another config is refused (or, with overwrite, every shard rewritten).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa

from pipeline import storage
from pipeline.config import BuildConfig, QueryConfig, QueryInput
from pipeline.shards import format_shard_id
from pipeline.stage import (
    FinishResult,
    PlanContext,
    PlannedStage,
    StageError,
    UnitContext,
    UnitResult,
    WorkUnit,
)
from pipeline.stage import config_hash as _config_hash
from schemas.tables import MANIFEST

log = logging.getLogger(__name__)

STAGE = "query"
TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".tsv")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Candidate:
    """One input row before de-duplication and opt-outs."""

    source_label: str  # the identity as the source names it (a WebFace260M label, or derived from the name)
    name: str
    url: str
    source_idx: str | None = None


# -- normalisation ---------------------------------------------------------------------------------------


def fold(text: str) -> str:
    """Case- and accent-insensitive form: NFKD, combining marks removed, casefolded."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(fold(text)))


def derived_label(name: str) -> str:
    """A filesystem-safe, stable label for inputs that give only a name (a slug plus a hash of the name)."""
    slug = "_".join(words(name))
    slug = re.sub(r"[^a-z0-9_]", "", slug.encode("ascii", "ignore").decode())[:48] or "name"
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def sample_id(source_label: str, url: str) -> str:
    return hashlib.sha1(f"{source_label}\x00{url}".encode()).hexdigest()[:20]


def url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


def load_list(value: list[str] | str | None) -> list[str]:
    """A config list given inline or as a file with one entry per line (blank lines and # comments skipped)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [v.strip() for v in value if v.strip()]
    if not storage.exists(value):
        raise StageError(f"list file {value} not found (give a list in the config, or an existing file)")
    lines = storage.get_bytes(value).decode("utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


# -- readers: each yields Candidate rows or a reason string for a skipped row ------------------------------


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_url_lst(path: str | Path) -> Iterator[Candidate | str]:
    with storage.open_read(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw.rstrip(b"\r\n"))
            if line is None:
                log.warning("%s:%d: not UTF-8, skipped", path, lineno)
                yield "not_utf8"
                continue
            if not line.strip():
                continue
            tokens = line.split()
            if len(tokens) < 3:
                yield "malformed_line"
                continue
            idx, label, url = tokens[0], tokens[1], " ".join(tokens[2:])
            yield Candidate(source_label=label, name=label, url=url, source_idx=idx)


def _suffix(path: str | Path) -> str:
    return PurePosixPath(os.fspath(path)).suffix.lower()


def _iter_records(path: str | Path, columns: list[str]) -> Iterator[dict | str]:
    """Rows of a CSV/TSV/JSONL/parquet file as dicts of str (only `columns`), or a skip reason."""
    suffix = _suffix(path)
    if suffix == ".parquet":
        pf = storage.parquet_file(path)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=cols, batch_size=65_536):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                row: dict = {}
                for c in cols:
                    v = data[c][i]
                    if isinstance(v, bytes):
                        v = _decode(v)
                        if v is None:
                            row = {"__skip__": "not_utf8"}
                            break
                    row[c] = None if v is None else str(v)
                yield row.get("__skip__") or row
    elif suffix in (".csv", ".tsv"):
        with storage.open_read(path) as fh:
            # surrogateescape keeps invalid bytes visible as lone surrogates, so a bad row is found and skipped
            # instead of failing the whole file
            text = io.TextIOWrapper(fh, encoding="utf-8", errors="surrogateescape", newline="")
            reader = csv.DictReader(text, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                vals = {c: rec.get(c) for c in columns}
                if any(v is not None and _has_surrogate(v) for v in vals.values()):
                    yield "not_utf8"
                    continue
                yield vals
    elif suffix in (".jsonl", ".json"):
        with storage.open_read(path) as fh:
            for raw in fh:
                line = _decode(raw)
                if line is None:
                    yield "not_utf8"
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    yield "malformed_line"
                    continue
                if not isinstance(rec, dict):
                    yield "malformed_line"
                    continue
                yield {c: (None if rec.get(c) is None else str(rec.get(c))) for c in columns}
    else:
        raise StageError(f"{path}: unsupported table format '{suffix}' (use .csv, .tsv, .jsonl or .parquet)")


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


def read_table(path: str | Path) -> Iterator[Candidate | str]:
    # `source_label` is the manifest's name for it; `label` is what WebFace260M-style tables call it
    for rec in _iter_records(path, ["name", "source_label", "label", "url", "idx"]):
        if isinstance(rec, str):
            yield rec
            continue
        url = (rec.get("url") or "").strip()
        name = (rec.get("name") or "").strip()
        label = (rec.get("source_label") or rec.get("label") or "").strip()
        if not url or not (name or label):
            yield "missing_field"
            continue
        yield Candidate(source_label=label or derived_label(name), name=name or label, url=url,
                        source_idx=rec.get("idx"))


class NameIndex:
    """Whole-word name lookup over caption word sequences (first word -> names starting with it)."""

    def __init__(self, names: Iterable[str]):
        self.by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        seen: set[tuple[str, ...]] = set()
        for name in names:
            toks = words(name)
            if not toks or toks in seen:
                continue
            seen.add(toks)
            self.by_first.setdefault(toks[0], []).append((toks, name))

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_first.values())

    def find(self, caption: str) -> list[str]:
        toks = words(caption)
        found: list[str] = []
        for i, t in enumerate(toks):
            for name_toks, name in self.by_first.get(t, ()):
                if toks[i : i + len(name_toks)] == name_toks and name not in found:
                    found.append(name)
        return found


def read_captions(path: str | Path, index: NameIndex) -> Iterator[Candidate | str]:
    for rec in _iter_records(path, ["url", "caption"]):
        if isinstance(rec, str):
            yield rec
            continue
        url, caption = (rec.get("url") or "").strip(), rec.get("caption") or ""
        if not url:
            yield "missing_field"
            continue
        names = index.find(caption)
        if not names:
            yield "no_match"
            continue
        for name in names:
            yield Candidate(source_label=derived_label(name), name=name, url=url)


def input_files(path: str) -> list[str]:
    """The files of one input: the path itself, or the files of a folder / prefix (hidden and `_` ones
    skipped), sorted. Local paths and storage URIs (`s3://bucket/urls/`) alike."""
    if storage.is_local(path):
        p = storage.local_path(path)
        if p.is_dir():
            files = sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
            if not files:
                raise StageError(f"query input directory {p} holds no files")
            return files
        if not p.exists():
            raise StageError(f"query input {p} not found")
        return [str(p)]
    listing = storage.list_dir(path)
    names = sorted(n for n in listing if not n.startswith((".", "_")))
    if names:
        return [storage.join(path, n) for n in names]
    if storage.exists(path):
        return [path]
    raise StageError(f"query input {path} not found (or an empty prefix)")


def detect_format(inp: QueryInput, path: str | Path) -> str:
    if inp.format != "auto":
        return inp.format
    if inp.names is not None:
        return "captions"
    if _suffix(path) in TABLE_SUFFIXES:
        return "table"
    return "url_lst"


def iter_file(inp: QueryInput, path: str | Path, index: NameIndex | None) -> Iterator[Candidate | str]:
    fmt = detect_format(inp, path)
    if fmt == "url_lst":
        yield from read_url_lst(path)
    elif fmt == "table":
        yield from read_table(path)
    else:
        if index is None:
            raise StageError(f"query input {inp.path}: format 'captions' needs `names` (a list or a file)")
        yield from read_captions(path, index)


def iter_input(inp: QueryInput) -> Iterator[Candidate | str]:
    index = NameIndex(load_list(inp.names)) if inp.names is not None else None
    for path in input_files(inp.path):
        yield from iter_file(inp, path, index)


# -- the stage -------------------------------------------------------------------------------------------


class ManifestBuilder:
    """Applies URL checks, per-name de-duplication, opt-outs and caps; packs names into shards."""

    def __init__(self, cfg: QueryConfig):
        self.cfg = cfg
        self.optout_names = {fold(n).strip() for n in load_list(cfg.optout_names)}
        self.optout_domains = {d.lower().lstrip(".").rstrip(".") for d in load_list(cfg.optout_domains)}
        # 8-byte digests of (source_label, url): memory ~ 100 B per unique row (see docs/download.md for scale)
        self.seen: set[bytes] = set()
        self.by_label: dict[str, list[dict]] = {}  # insertion order = first appearance of the name
        self.drops: Counter = Counter()
        self.rows_in = 0

    def domain_opted_out(self, url: str) -> bool:
        host = host_of(url)
        return any(host == d or host.endswith("." + d) for d in self.optout_domains)

    def add(self, item: Candidate | str, cap: int | None) -> None:
        self.rows_in += 1
        if isinstance(item, str):
            self.drops[item] += 1
            return
        if not url_ok(item.url):
            self.drops["bad_url"] += 1
            return
        if self.optout_names and (
            fold(item.name).strip() in self.optout_names or fold(item.source_label).strip() in self.optout_names
        ):
            self.drops["optout_name"] += 1
            return
        if self.optout_domains and self.domain_opted_out(item.url):
            self.drops["optout_domain"] += 1
            return
        key = hashlib.blake2b(f"{item.source_label}\x00{item.url}".encode(), digest_size=8).digest()
        if key in self.seen:
            self.drops["duplicate_url"] += 1
            return
        rows = self.by_label.setdefault(item.source_label, [])
        if cap is not None and len(rows) >= cap:
            self.drops["name_cap"] += 1
            return
        self.seen.add(key)
        rows.append({
            "sample_id": sample_id(item.source_label, item.url),
            "source_label": item.source_label,
            "name": item.name,
            "url": item.url,
            "source_idx": item.source_idx,
        })

    @property
    def rows_out(self) -> int:
        return sum(len(r) for r in self.by_label.values())

    def pack(self) -> list[tuple[list[dict], str | None]]:
        """Name-aligned shards: (rows, split_label) in shard order; split_label names a name too big for one."""
        size = self.cfg.shard_size
        shards: list[tuple[list[dict], str | None]] = []
        cur: list[dict] = []
        for label, rows in self.by_label.items():
            if not rows:
                continue
            if len(rows) > size:
                if cur:
                    shards.append((cur, None))
                    cur = []
                shards += [(rows[i:i + size], label) for i in range(0, len(rows), size)]
                continue
            if cur and len(cur) + len(rows) > size:
                shards.append((cur, None))
                cur = []
            cur = cur + rows if cur else list(rows)
        if cur or not shards:
            shards.append((cur, None))  # the last partial shard (or one empty shard for an empty result)
        return shards


def input_fingerprint(cfg: QueryConfig) -> list[list]:
    """(path, size, mtime) of every input and list file: an edited input makes the output stale.
    (On object stores: size only, from one listing per input prefix.)"""
    paths: list[str] = []
    for inp in cfg.inputs:
        try:
            paths += input_files(inp.path)
        except StageError:
            paths.append(inp.path)  # missing: reported by the reader with a clear error
        if isinstance(inp.names, str):
            paths.append(inp.names)
    paths += [v for v in (cfg.optout_names, cfg.optout_domains) if isinstance(v, str)]
    out = []
    for f in paths:
        try:
            if storage.is_local(f):
                st = Path(f).stat()
                out.append([f, st.st_size, st.st_mtime_ns])
            else:
                out.append([f, storage.size(f), None])
        except (OSError, StageError):
            out.append([f, None, None])
    return out


def _read_file(inp: QueryInput, path: str) -> pa.Table:
    """One input file's candidates and skips as a table (what a parallel read task returns)."""
    index = NameIndex(load_list(inp.names)) if inp.names is not None else None
    cols: dict[str, list] = {"source_label": [], "name": [], "url": [], "source_idx": [], "skip": []}
    for item in iter_file(inp, path, index):
        if isinstance(item, str):
            vals = [None, None, None, None, item]
        else:
            vals = [item.source_label, item.name, item.url, item.source_idx, None]
        for c, v in zip(cols, vals, strict=True):
            cols[c].append(v)
    return pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})


def _items(t: pa.Table) -> Iterator[Candidate | str]:
    d = t.to_pydict()
    for label, name, url, idx, skip in zip(d["source_label"], d["name"], d["url"], d["source_idx"], d["skip"], strict=True):
        yield skip if skip is not None else Candidate(source_label=label, name=name, url=url, source_idx=idx)


def iter_all(cfg: QueryConfig, parallel: bool = False) -> Iterator[tuple[QueryInput, Candidate | str]]:
    """Every input row of every input, in order. `parallel`: files read as Ray tasks (Ray must be running)."""
    files = [(inp, str(p)) for inp in cfg.inputs for p in input_files(inp.path)]
    for inp, p in files:
        if detect_format(inp, p) == "captions" and inp.names is None:
            raise StageError(f"query input {inp.path}: format 'captions' needs `names` (a list or a file)")
    if not parallel or len(files) < 2:
        for inp, p in files:
            for item in iter_file(inp, p, NameIndex(load_list(inp.names)) if inp.names is not None else None):
                yield inp, item
        return
    import ray

    read = ray.remote(num_cpus=1, max_retries=2)(_read_file)
    refs = [read.remote(inp, p) for inp, p in files]
    for (inp, _p), ref in zip(files, refs, strict=True):  # merged in file order: same result as serial
        table = ray.get(ref)
        yield from ((inp, item) for item in _items(table))


class QueryStage(PlannedStage):
    """The query on the contract: a global plan, one unit per name-aligned manifest shard."""

    name = STAGE
    output_schema = MANIFEST
    sort_keys = ()  # rows keep the plan's order: names by first appearance, each name's rows in input order

    def __init__(self, config: QueryConfig, parallel: bool = False):
        super().__init__(config)
        self.parallel = parallel
        self._shards: list[tuple[list[dict], str | None]] | None = None
        self._identities = 0

    def __getstate__(self) -> dict:
        raise StageError("the query stage holds its plan in the driver: run it on the local executor")

    def config_hash(self) -> str:
        cfg: QueryConfig = self.config
        return _config_hash({"config": cfg.model_dump(mode="json"), "files": input_fingerprint(cfg)})

    def input_hash(self, ctx: PlanContext) -> str | None:
        return None  # the input files are in config_hash (paths, sizes, times)

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        cfg: QueryConfig = self.config
        builder = ManifestBuilder(cfg)
        for inp, item in iter_all(cfg, parallel=self.parallel):
            builder.add(item, inp.per_name_cap or cfg.per_name_cap)
        self._shards = builder.pack()
        self._identities = sum(1 for rows in builder.by_label.values() if rows)
        units = []
        for i, (rows, split) in enumerate(self._shards):
            payload: dict = {"index": i, "rows": len(rows)}
            if split is not None:
                payload["split_label"] = split
            if i == 0:
                # Input-level counts (rows read, drop reasons) belong to no single shard: shard 0 carries them,
                # so the roll-up (a plain sum) reports them.
                payload["input_rows"] = builder.rows_in - builder.rows_out
                payload["input_drops"] = dict(sorted(builder.drops.items()))
            units.append(WorkUnit(format_shard_id(i), payload))
        return units

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        if self._shards is None:
            raise StageError("query units run in the process that planned them (the local executor)")
        rows, split = self._shards[int(unit.payload["index"])]
        table = MANIFEST.from_rows(rows)
        extra = {"split_label": split} if split is not None else {}
        return UnitResult(table, rows_in=len(rows) + int(unit.payload.get("input_rows", 0)),
                          drops=Counter(unit.payload.get("input_drops", {})), extra_stats=extra)

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        # A short-circuited re-run (finished output) never planned: keep the identities already recorded.
        if self._shards is None:
            return FinishResult()
        split = sorted({lab for _, lab in self._shards if lab is not None})
        return FinishResult(stats={"identities": self._identities, "split_names": len(split)})


def build_manifest(cfg: QueryConfig, output: str | os.PathLike, overwrite: bool = False,
                   parallel: bool = False) -> dict:
    """Write the manifest of `cfg.inputs` into `output` (a path or URI); returns the roll-up stats."""
    from pipeline.executors import LocalExecutor

    if not cfg.inputs:
        raise StageError("query: no inputs configured (set query.inputs: [{path: url.lst}, ...])")
    stats = LocalExecutor().run(QueryStage(cfg, parallel=parallel), None, output, overwrite=overwrite).stats
    log.info("query: %d rows in, %d manifest rows, %s identities, drops %s",
             stats["rows_in"], stats["rows_out"], stats.get("identities"), stats["drops"])
    return stats


def run(cfg: BuildConfig, inputs: dict, output: str | os.PathLike, overwrite: bool = False) -> dict:
    """Registry entry point (the query stage reads config inputs, not an earlier stage). On a Ray build the
    input files are read in parallel as Ray tasks."""
    parallel = cfg.run.executor == "ray" and sum(len(input_files(i.path)) for i in cfg.query.inputs) > 1
    if parallel:
        from pipeline.runtime import init_ray

        init_ray(cfg.run.ray_address)
    return build_manifest(cfg.query, output, overwrite=overwrite, parallel=parallel)
