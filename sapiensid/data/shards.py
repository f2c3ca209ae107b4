"""Reading WebBody WebDataset shards: URL expansion, opening (local, `pipe:`, http, or any fsspec URL), tar
parsing with `webdataset`, and decoding one sample into (image, 22 keypoints, class id, meta)."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import braceexpand
import numpy as np
import webdataset as wds
from webdataset import tariterators

from sapiensid.data.transforms import keypoints22_from_meta
from schemas.base import SchemaError
from schemas.imaging import decode_image
from schemas.sample import validate_sample

log = logging.getLogger(__name__)

# Schemes webdataset's own gopen handles; anything else with a scheme goes through fsspec.
_GOPEN_SCHEMES = {"", "file", "pipe", "http", "https"}


def expand_urls(spec: str | os.PathLike | Iterable[str], split: str | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a glob, a directory of bundle shards (optionally one split), or a list."""
    if not isinstance(spec, (str, os.PathLike)):
        out: list[str] = []
        for item in spec:
            out.extend(expand_urls(item, split))
        return out
    spec = str(spec)
    scheme = urlparse(spec).scheme
    if scheme not in _GOPEN_SCHEMES and len(scheme) > 1:
        return _expand_remote(spec, split)
    if scheme in ("", "file") and os.path.isdir(spec.removeprefix("file://")):
        pattern = f"webbody-{split}-*.tar" if split else "*.tar"
        found = sorted(glob.glob(os.path.join(spec.removeprefix("file://"), pattern)))
        if not found:
            raise FileNotFoundError(f"no shards matching {pattern} in {spec}")
        return found
    if scheme == "" and any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shards match {spec}")
        return found
    return list(braceexpand.braceexpand(spec))


def _expand_remote(spec: str, split: str | None) -> list[str]:
    """An object-store prefix (s3://bucket/bundle: its shards, optionally one split), a glob, or a brace pattern,
    listed through fsspec (s3fs, gcsfs, ...): one listing, no per-shard request."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if any(ch in path for ch in "*?["):
        found = sorted(fs.glob(path))
    else:
        pattern = f"webbody-{split}-" if split else ""
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            entries = []
        names = [e["name"] for e in entries if e.get("type") == "file"]
        found = sorted(n for n in names if n.endswith(".tar") and os.path.basename(n).startswith(pattern))
        if not found and fs.isfile(path):
            found = [path]
    if not found:
        raise FileNotFoundError(f"no shards at {spec}" + (f" for split {split!r}" if split else ""))
    return [fs.unstrip_protocol(p) for p in found]


def open_url(url: str):
    """A binary read stream for one shard."""
    scheme = urlparse(url).scheme
    if scheme in _GOPEN_SCHEMES or len(scheme) == 1:  # len 1: a Windows drive letter
        return wds.gopen(url, "rb")
    import fsspec  # only for remote object stores (s3://, gs://, memory://, ...)

    return fsspec.open(url, "rb").open()


def iter_raw(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `__url__`, `jpg`, `json`, ...) of each shard in order, via webdataset's tar
    parsing. Shards are opened lazily, one at a time."""

    def streams() -> Iterator[dict[str, Any]]:
        for url in urls:
            yield {"url": url, "stream": open_url(url)}

    files = tariterators.tar_file_expander(streams())
    yield from tariterators.group_by_keys(files)


@dataclass
class Decoded:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: np.ndarray  # (22, 2) pixel coordinates of `image`, -1 missing
    class_id: int  # the sample record's `class_id`
    meta: dict[str, Any]


class DecodeError(ValueError):
    """A sample that cannot be used; the loaders count and skip it."""


def decode_sample(raw: dict[str, Any]) -> Decoded:
    """Decode a raw shard sample; raise DecodeError with the key on anything unusable."""
    key = raw.get("__key__", "?")
    if "jpg" not in raw or "json" not in raw:
        raise DecodeError(f"{key}: missing .jpg or .json member")
    try:
        meta = json.loads(raw["json"])
        meta = validate_sample(meta, where=key)  # an older rename-only version comes back upgraded
    except (json.JSONDecodeError, SchemaError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{key}: bad metadata ({exc})") from exc
    image = decode_image(raw["jpg"])
    if image is None:
        raise DecodeError(f"{key}: image does not decode")
    frame = max(image.shape[:2])
    return Decoded(image, keypoints22_from_meta(meta, frame), int(meta["class_id"]), meta)


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each."""

    def __init__(self, max_logged: int = 5) -> None:
        self.counts: dict[str, int] = {}
        self.max_logged = max_logged

    def skip(self, reason: str, message: str) -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n <= self.max_logged:
            log.warning("skipping sample (%s): %s", reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def iter_decoded(urls: Iterable[str], skips: SkipCounter | None = None) -> Iterator[Decoded]:
    """Every decodable sample of the shards in order (evaluation); bad ones are counted in `skips`."""
    skips = skips if skips is not None else SkipCounter()
    for raw in iter_raw(urls):
        try:
            yield decode_sample(raw)
        except DecodeError as exc:
            skips.skip("decode_error", str(exc))
