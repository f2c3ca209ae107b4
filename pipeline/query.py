"""Query stage: name queries and URL lists -> a sharded URL manifest (schemas.tables.MANIFEST).

Inputs (config `query.inputs`, any mix, read in order):
- `url_lst`: WebFace260M / WebBody `url.lst` lines `idx label URL...`; tokens after the second are re-joined
  with single spaces into the URL (URLs may contain spaces), as the official make_parquet step does.
- `table`: CSV, JSONL or parquet with a `url` column and `name` and/or `label`.
- `captions`: LAION-style metadata (parquet/CSV/JSONL with `url` and `caption`) searched for a list of names:
  whole-word, case- and accent-insensitive, at most `per_name_cap` URLs per name.

Every input row ends up in the manifest or counted under a reason: `malformed_line`, `missing_field`,
`not_utf8`, `bad_url` (not http(s) with a host), `duplicate_url` (same URL twice for one identity),
`optout_name`, `optout_domain`, `name_cap`, and for captions `no_match`. Sample ids are a hash of
(label, url), so the same input always gives the same ids, and rows keep input order across shards.

The stage is global (duplicates are found across the whole input), small and fast; a re-run with the same
config on a finished output returns its stats, otherwise every shard is rewritten.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BuildConfig, QueryConfig, QueryInput
from pipeline.rollup import write_rollup
from pipeline.shards import DatasetDir, atomic_write_json, format_shard_id
from pipeline.stage import StageError, config_hash
from schemas.tables import MANIFEST

log = logging.getLogger(__name__)

STAGE = "query"
TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".tsv")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class Candidate:
    """One input row before de-duplication and opt-outs."""

    label: str
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


def sample_id(label: str, url: str) -> str:
    return hashlib.sha1(f"{label}\x00{url}".encode()).hexdigest()[:20]


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
    p = Path(value)
    if not p.exists():
        raise StageError(f"list file {p} not found (give a list in the config, or an existing file)")
    lines = p.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


# -- readers: each yields Candidate rows or a reason string for a skipped row ------------------------------


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_url_lst(path: Path) -> Iterator[Candidate | str]:
    with open(path, "rb") as fh:
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
            yield Candidate(label=label, name=label, url=url, source_idx=idx)


def _iter_records(path: Path, columns: list[str]) -> Iterator[dict | str]:
    """Rows of a CSV/TSV/JSONL/parquet file as dicts of str (only `columns`), or a skip reason."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pf = pq.ParquetFile(path)
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
        with open(path, "rb") as fh:
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
        with open(path, "rb") as fh:
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


def read_table(path: Path) -> Iterator[Candidate | str]:
    for rec in _iter_records(path, ["name", "label", "url", "idx"]):
        if isinstance(rec, str):
            yield rec
            continue
        url = (rec.get("url") or "").strip()
        name = (rec.get("name") or "").strip()
        label = (rec.get("label") or "").strip()
        if not url or not (name or label):
            yield "missing_field"
            continue
        yield Candidate(label=label or derived_label(name), name=name or label, url=url, source_idx=rec.get("idx"))


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


def read_captions(path: Path, index: NameIndex) -> Iterator[Candidate | str]:
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
            yield Candidate(label=derived_label(name), name=name, url=url)


def input_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
        if not files:
            raise StageError(f"query input directory {p} holds no files")
        return files
    if not p.exists():
        raise StageError(f"query input {p} not found")
    return [p]


def detect_format(inp: QueryInput, path: Path) -> str:
    if inp.format != "auto":
        return inp.format
    if inp.names is not None:
        return "captions"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    return "url_lst"


def iter_input(inp: QueryInput) -> Iterator[Candidate | str]:
    index = NameIndex(load_list(inp.names)) if inp.names is not None else None
    for path in input_files(inp.path):
        fmt = detect_format(inp, path)
        if fmt == "url_lst":
            yield from read_url_lst(path)
        elif fmt == "table":
            yield from read_table(path)
        else:
            if index is None:
                raise StageError(f"query input {inp.path}: format 'captions' needs `names` (a list or a file)")
            yield from read_captions(path, index)


# -- the stage -------------------------------------------------------------------------------------------


class ManifestBuilder:
    """Applies URL checks, per-name de-duplication, opt-outs and caps; writes fixed-size shards."""

    def __init__(self, cfg: QueryConfig, out: DatasetDir):
        self.cfg = cfg
        self.out = out
        self.optout_names = {fold(n).strip() for n in load_list(cfg.optout_names)}
        self.optout_domains = {d.lower().lstrip(".").rstrip(".") for d in load_list(cfg.optout_domains)}
        # 8-byte digests of (label, url): memory ~ 100 B per unique row (see docs/download.md for scale)
        self.seen: set[bytes] = set()
        self.per_label: Counter = Counter()
        self.drops: Counter = Counter()
        self.rows_in = 0
        self.buffer: list[dict] = []
        self.shard_ids: list[str] = []

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
            fold(item.name).strip() in self.optout_names or fold(item.label).strip() in self.optout_names
        ):
            self.drops["optout_name"] += 1
            return
        if self.optout_domains and self.domain_opted_out(item.url):
            self.drops["optout_domain"] += 1
            return
        key = hashlib.blake2b(f"{item.label}\x00{item.url}".encode(), digest_size=8).digest()
        if key in self.seen:
            self.drops["duplicate_url"] += 1
            return
        if cap is not None and self.per_label[item.label] >= cap:
            self.drops["name_cap"] += 1
            return
        self.seen.add(key)
        self.per_label[item.label] += 1
        self.buffer.append(
            {
                "sample_id": sample_id(item.label, item.url),
                "label": item.label,
                "name": item.name,
                "url": item.url,
                "source_idx": item.source_idx,
            }
        )
        if len(self.buffer) >= self.cfg.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.shard_ids:
            return
        sid = format_shard_id(len(self.shard_ids))
        table = MANIFEST.from_rows(self.buffer)
        n = table.num_rows
        stats = {"stage": STAGE, "shard": sid, "rows_in": n, "rows_out": n, "drops": {}, "seconds": 0.0}
        self.out.commit_shard(sid, table, stats)
        self.shard_ids.append(sid)
        self.buffer = []


def input_fingerprint(cfg: QueryConfig) -> list[list]:
    """(path, size, mtime) of every input and list file: an edited input makes the output stale."""
    paths: list[str] = []
    for inp in cfg.inputs:
        p = Path(inp.path)
        paths += [str(f) for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        if isinstance(inp.names, str):
            paths.append(inp.names)
    paths += [v for v in (cfg.optout_names, cfg.optout_domains) if isinstance(v, str)]
    out = []
    for f in paths:
        try:
            st = Path(f).stat()
            out.append([f, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([f, None, None])  # missing: reported by the reader with a clear error
    return out


def build_manifest(cfg: QueryConfig, output: Path, overwrite: bool = False) -> dict:
    """Write the manifest of `cfg.inputs` into `output`; returns the roll-up stats."""
    if not cfg.inputs:
        raise StageError("query: no inputs configured (set query.inputs: [{path: url.lst}, ...])")
    out = DatasetDir(output)
    meta = {"stage": STAGE, "config_hash": config_hash({"config": cfg.model_dump(mode="json"),
                                                        "files": input_fingerprint(cfg)})}
    meta_path = out.root / "_stage.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old == meta and out.complete() and not overwrite:
            return json.loads((out.root / "stats.json").read_text())
        if old != meta and not overwrite:
            raise StageError(
                f"{out.root} holds '{old.get('stage')}' output made with config {old.get('config_hash')}, "
                f"this run is '{STAGE}' with config {meta['config_hash']} (the hash covers the settings and the "
                "input files' sizes and times): use a new output directory or --overwrite"
            )
    out.root.mkdir(parents=True, exist_ok=True)
    out.clean_temporaries()
    (out.root / "stats.json").unlink(missing_ok=True)
    for sid in out.shard_ids():  # the query is global: a re-run rewrites every shard
        out.marker(sid).unlink(missing_ok=True)
        out.parquet(sid).unlink(missing_ok=True)
        out.stats_path(sid).unlink(missing_ok=True)
    atomic_write_json(meta_path, meta)

    builder = ManifestBuilder(cfg, out)
    for inp in cfg.inputs:
        cap = inp.per_name_cap or cfg.per_name_cap
        for item in iter_input(inp):
            builder.add(item, cap)
    builder.flush()  # the last partial shard (or one empty shard for an empty result)

    # Input-level counts (rows read, drop reasons) belong to no single shard: put them on shard 0's stats
    # so the roll-up (a plain sum) reports them.
    first = builder.shard_ids[0]
    st = out.shard_stats(first)
    st["rows_in"] += builder.rows_in - sum(out.num_rows(s) for s in builder.shard_ids)
    st["drops"] = dict(sorted(builder.drops.items()))
    out.commit_shard(first, out.read_shard(first), st)
    stats = write_rollup(out, STAGE, builder.shard_ids)
    stats["identities"] = len(builder.per_label)
    atomic_write_json(out.root / "stats.json", stats)
    log.info("query: %d rows in, %d manifest rows, %d identities, drops %s",
             stats["rows_in"], stats["rows_out"], stats["identities"], stats["drops"])
    return stats


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Registry entry point (the query stage reads config inputs, not an earlier stage)."""
    return build_manifest(cfg.query, Path(output), overwrite=overwrite)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Helper for callers that build a manifest by hand (tests, demo): ids filled in, schema validated."""
    full = [{**r, "sample_id": r.get("sample_id") or sample_id(r["label"], r["url"])} for r in rows]
    return MANIFEST.from_rows(full)
