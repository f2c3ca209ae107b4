"""`webbody verify DIR`: every shard of a bundle against its index, its stats and the sample schema.

Checks, each reported with the shard, the key and the member it concerns:
- the files: index.parquet (schema), stats.json, exactly the shards stats.json lists (none missing, none
  stray), each with the size and sha256 it lists;
- every shard parses to the end (read through the bundle's output writer, pipeline/bundle/writers.py); a
  sample's members are contiguous and exactly those the index lists (`.jpg`, `.json`, `.face.npy` when
  indexed), at the indexed data offsets and sizes, with the indexed sha256;
- the image decodes to image_size x image_size; the record parses, passes `schemas.sample.validate_sample`
  (keypoint count, visibility in [0, 1], visible points inside the frame, boxes ordered), names the same
  key/class_id/split/identity as the index, and its keypoint visibility matches the index's mask;
- counts: samples per shard and per split, and the total, as stats.json says.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipeline.bundle.layout import listed_tars
from pipeline.bundle.render import visible_mask
from pipeline.bundle.writers import OutputWriter, ShardReadError, StoredMember, writer_of
from pipeline.shards import file_sha256
from pipeline.stage import StageError
from schemas.base import SchemaError
from schemas.bundle import BUNDLE_INDEX
from schemas.sample import validate_sample


@dataclass(frozen=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _load(root: Path) -> tuple[list[Problem], dict | None, list[dict] | None]:
    problems: list[Problem] = []
    stats = index = None
    if not root.is_dir():
        return [Problem(str(root), "not a directory")], None, None
    try:
        stats = json.loads((root / "stats.json").read_text())
    except FileNotFoundError:
        problems.append(Problem("stats.json", "missing"))
    except ValueError as exc:
        problems.append(Problem("stats.json", f"not valid JSON ({exc})"))
    try:
        index = BUNDLE_INDEX.validate(pq.read_table(root / "index.parquet"), "index.parquet").to_pylist()
    except FileNotFoundError:
        problems.append(Problem("index.parquet", "missing"))
    except (SchemaError, OSError, ValueError) as exc:
        problems.append(Problem("index.parquet", f"unreadable or wrong schema ({exc})"))
    return problems, stats, index


def verify_bundle(root: str | Path, decode_images: bool = True) -> list[Problem]:
    """Every problem found (empty list: the bundle is intact). On an object store the bundle's objects are
    downloaded to a temporary folder first (verification reads every byte anyway)."""
    from pipeline import storage

    if not storage.is_local(str(root)):
        from pipeline.bundle.store import local_folder

        with local_folder(str(root)) as tmp:
            return verify_bundle(tmp, decode_images)
    root = Path(root)
    problems, stats, index = _load(root)
    if stats is None or index is None:
        return problems
    try:
        writer = writer_of(stats)
    except StageError as exc:
        return [*problems, Problem("stats.json", str(exc))]
    size = int(stats.get("image_size", 384))
    listed = listed_tars(stats)
    on_disk = {p.name for p in root.iterdir() if writer.is_shard(p.name)}
    for name in sorted(on_disk - set(listed)):
        problems.append(Problem(name, "shard on disk but not in stats.json (stray or renamed file)"))
    for name in sorted(set(listed) - on_disk):
        problems.append(Problem(name, "shard listed in stats.json is missing"))
    keys = Counter(r["key"] for r in index)
    for key, n in keys.items():
        if n > 1:
            problems.append(Problem("index.parquet", f"key {key} appears {n} times"))
    rows_by_shard: dict[str, list[dict]] = {}
    for r in index:
        rows_by_shard.setdefault(r["shard"], []).append(r)
    for shard in sorted(set(rows_by_shard) - set(listed)):
        problems.append(Problem("index.parquet", f"rows point at shard {shard}, which stats.json does not list"))
    for shard in sorted(set(listed) & on_disk):
        problems += verify_shard(root / shard, sorted(rows_by_shard.get(shard, []), key=lambda r: r["position"]),
                                 listed[shard], size, decode_images, writer)
    if stats.get("rows_out") != len(index):
        problems.append(Problem("stats.json", f"rows_out {stats.get('rows_out')} but the index has {len(index)} rows"))
    for split, info in (stats.get("splits") or {}).items():
        n = sum(1 for r in index if r["split"] == split)
        if info.get("samples") != n:
            problems.append(Problem("stats.json", f"split {split}: {info.get('samples')} samples listed, index has {n}"))
    return problems


def verify_shard(path: Path, rows: list[dict], listed: dict, size: int, decode_images: bool = True,
                 writer: OutputWriter | None = None) -> list[Problem]:
    writer = writer or writer_of(None)
    kind = writer.kind
    shard = path.name
    problems: list[Problem] = []
    actual_bytes = path.stat().st_size
    if actual_bytes != listed.get("bytes"):
        problems.append(Problem(shard, f"size {actual_bytes} bytes, stats.json says {listed.get('bytes')} (truncated "
                                       "or appended)"))
    by_key = {r["key"]: r for r in rows}
    seen: list[str] = []
    members: dict[str, dict[str, StoredMember]] = {}
    unreadable = False
    try:
        for m in writer.iter_members(path):
            if not seen or seen[-1] != m.key:
                if m.key in members:
                    problems.append(Problem(shard, f"{m.key}: members not contiguous ({m.key}.{m.ext} after another "
                                                   "key)"))
                seen.append(m.key)
            members.setdefault(m.key, {})[m.ext] = m
    except (ShardReadError, OSError) as exc:
        unreadable = True
        where = f"after member {seen[-1]}" if seen else "at the start"
        problems.append(Problem(shard, f"{kind} unreadable {where}: {exc}"))
    for key in seen:
        if key not in by_key:
            problems.append(Problem(shard, f"{key}: in the {kind} but not in the index"))
    for r in rows:
        got = members.get(r["key"])
        if got is None:
            problems.append(Problem(shard, f"{r['key']}: in the index but missing from the {kind}"))
            continue
        problems += _check_sample(shard, r, got, size, decode_images)
    if listed.get("samples") != len(rows):
        problems.append(Problem(shard, f"stats.json lists {listed.get('samples')} samples, index has {len(rows)}"))
    if len(seen) != len(rows) and not unreadable:
        problems.append(Problem(shard, f"{kind} holds {len(seen)} samples, index has {len(rows)}"))
    if not problems and file_sha256(path) != listed.get("sha256"):
        problems.append(Problem(shard, f"sha256 differs from stats.json although every member matches: a {kind} "
                                       "header or padding byte changed"))
    return problems


def _check_sample(shard: str, r: dict, got: dict, size: int, decode_images: bool) -> list[Problem]:
    key = r["key"]
    out: list[Problem] = []
    expected = {"jpg": ("jpg_offset", "jpg_size", "member_sha256"), "json": ("json_offset", "json_size", "json_sha256")}
    if r["npy_offset"] is not None:
        expected["face.npy"] = ("npy_offset", "npy_size", "npy_sha256")
    for ext in sorted(set(got) - set(expected)):
        out.append(Problem(shard, f"{key}.{ext}: member not in the index"))
    for ext, (off_col, size_col, sha_col) in expected.items():
        if ext not in got:
            out.append(Problem(shard, f"{key}.{ext}: member missing"))
            continue
        m = got[ext]
        if m.data_offset != r[off_col] or m.size != r[size_col]:
            out.append(Problem(shard, f"{key}.{ext}: at offset {m.data_offset} size {m.size}, index says "
                                      f"{r[off_col]} size {r[size_col]}"))
        if hashlib.sha256(m.data).hexdigest() != r[sha_col]:
            out.append(Problem(shard, f"{key}.{ext}: sha256 mismatch (content changed)"))
    if "jpg" in got and decode_images:
        img = cv2.imdecode(np.frombuffer(got["jpg"].data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            out.append(Problem(shard, f"{key}.jpg: does not decode"))
        elif img.shape[:2] != (size, size):
            out.append(Problem(shard, f"{key}.jpg: {img.shape[1]}x{img.shape[0]}, expected {size}x{size}"))
    if "json" in got:
        out += _check_record(shard, r, got["json"].data, size)
    if "face.npy" in got:
        try:
            arr = np.load(io.BytesIO(got["face.npy"].data), allow_pickle=False)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)):
                out.append(Problem(shard, f"{key}.face.npy: not a finite 1-D feature"))
        except ValueError as exc:
            out.append(Problem(shard, f"{key}.face.npy: does not load ({exc})"))
    return out


def _check_record(shard: str, r: dict, data: bytes, size: int) -> list[Problem]:
    key = r["key"]
    try:
        meta = json.loads(data)
        meta = validate_sample(meta, where=key)
    except (ValueError, SchemaError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return [Problem(shard, f"{key}.json: {exc}")]
    out = []
    for field in ("key", "class_id", "split", "identity"):
        if meta[field] != r[field]:
            out.append(Problem(shard, f"{key}.json: {field} {meta[field]!r}, index says {r[field]!r}"))
    for i, (x, y, _) in enumerate(meta["keypoints"]):
        if not (math.isfinite(x) and math.isfinite(y)):
            out.append(Problem(shard, f"{key}.json: keypoint {i} is not finite"))
    if visible_mask(meta["keypoints"]) != r["kp_visible"]:
        out.append(Problem(shard, f"{key}.json: keypoint visibility differs from the index"))
    for box_field in ("content_box", "face_box"):
        box = meta.get(box_field)
        if box is not None and not all(-1.0 <= v <= size + 1.0 for v in box):
            out.append(Problem(shard, f"{key}.json: {box_field} {box} outside the {size} frame"))
    return out


def verify_main(root: str | Path, quiet: bool = False, max_lines: int = 50) -> int:
    """CLI body: 0 when intact, 1 with one line per problem on stderr otherwise, 2 if DIR is not a directory
    (or, on an object store, holds no object)."""
    from pipeline import storage
    from pipeline.bundle.store import as_store

    local = storage.is_local(str(root))
    if (local and not Path(root).is_dir()) or (not local and not as_store(str(root)).listing()):
        print(f"error: {root} is not a directory (give a bundle directory, <build>/bundle)", file=sys.stderr)
        return 2
    problems = verify_bundle(root)
    if problems:
        for p in problems[:max_lines]:
            print(f"CORRUPT {p}", file=sys.stderr)
        if len(problems) > max_lines:
            print(f"... and {len(problems) - max_lines} more", file=sys.stderr)
        print(f"{len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    if not quiet:
        stats = as_store(str(root)).read_json("stats.json")
        print(f"ok: {len(listed_tars(stats))} shards, {stats['rows_out']} samples verified in {root}")
    return 0
