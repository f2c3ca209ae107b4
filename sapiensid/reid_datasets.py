"""ReID evaluation sets from their standard folder layouts, and the WebBody-test split from our shards.

Each loader returns one or more :class:`ReIDSplit` (a query list and a gallery list of :class:`EvalItem`) plus the
protocols that apply. Images are read lazily (paths), so large galleries do not sit in memory.

Layouts (as distributed by their authors):
- Market-1501: ``query/``, ``bounding_box_test/``; file ``0002_c1s1_000451_03.jpg`` = pid 2, camera 1. pid -1
  (junk detections) is dropped; pid 0 (distractors) is kept in the gallery.
- LTCC: ``query/``, ``test/``; file ``001_1_c11_015861.png`` = pid 1, clothes 1 (of that pid), camera 11.
  Protocols: general, same-clothes, clothes-changing.
- PRCC: ``rgb/test/{A,B,C}/<pid>/*.jpg``; gallery = camera A, same-clothes queries = camera B, clothes-changing
  queries = camera C (each evaluated with the general rule; cameras always differ).
- WebBody shards (``split`` test, streamed by ``sapiensid.evaluate``: embedded as they are read, only features
  kept): the bundle marks each test sample's ``role`` (query / gallery) in its record;
  records without a role fall back to: per identity, the image whose key hash is smallest is the query and the
  rest form the gallery. Cameras are unknown (-1), so every other image of the identity is a good match.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass
class EvalItem:
    pid: int
    camid: int = -1
    clothes: int | None = None
    item_id: str = ""
    path: str | None = None  # image file, or
    image: np.ndarray | None = None  # a decoded RGB image (shards)
    points: np.ndarray | None = None  # (22, 2) pixel keypoints of the image, -1 missing


@dataclass
class ReIDSplit:
    name: str
    query: list[EvalItem]
    gallery: list[EvalItem]
    protocols: tuple[str, ...] = ("general",)
    notes: dict = field(default_factory=dict)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"expected folder {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


_MARKET = re.compile(r"^(-?\d+)_c(\d+)")


def _named_items(root: Path, folder: str, pattern: re.Pattern[str], what: str,
                 ids: Callable[[re.Match[str]], tuple[int, int, int | None] | None]) -> list[EvalItem]:
    """The images of `root/folder` whose file names `pattern` parses (else ValueError naming `what`), in name
    order; `ids(match)` gives (pid, camid, clothes), or None for a file the protocol leaves out."""
    items = []
    for p in _images(root / folder):
        m = pattern.match(p.name)
        if not m:
            raise ValueError(f"{p}: not {what}")
        found = ids(m)
        if found is not None:
            items.append(EvalItem(*found, item_id=f"{folder}/{p.name}", path=str(p)))
    return items


def load_market1501(root: str | Path) -> list[ReIDSplit]:
    root = Path(root)

    def ids(m: re.Match[str]) -> tuple[int, int, None] | None:
        pid, cam = int(m.group(1)), int(m.group(2)) - 1
        return None if pid == -1 else (pid, cam, None)  # junk detections are not part of the protocol

    def parse(folder: str) -> list[EvalItem]:
        return _named_items(root, folder, _MARKET, "a Market-1501 file name (pid_cN...)", ids)

    return [ReIDSplit("market1501", parse("query"), parse("bounding_box_test"))]


_LTCC = re.compile(r"^(\d+)_(\d+)_c(\d+)")


def load_ltcc(root: str | Path) -> list[ReIDSplit]:
    root = Path(root)
    clothes_ids: dict[tuple[int, int], int] = {}

    def ids(m: re.Match[str]) -> tuple[int, int, int]:
        pid, clo, cam = int(m.group(1)), int(m.group(2)), int(m.group(3))
        return pid, cam, clothes_ids.setdefault((pid, clo), len(clothes_ids))

    def parse(folder: str) -> list[EvalItem]:
        return _named_items(root, folder, _LTCC, "an LTCC file name (pid_clothes_cN_...)", ids)

    q, g = parse("query"), parse("test")
    return [ReIDSplit("ltcc", q, g, ("general", "same_clothes", "clothes_changing"))]


def load_prcc(root: str | Path) -> list[ReIDSplit]:
    root = Path(root)
    base = root / "rgb" / "test" if (root / "rgb" / "test").is_dir() else root

    def parse(cam_folder: str, camid: int) -> list[EvalItem]:
        items = []
        folder = base / cam_folder
        if not folder.is_dir():
            raise FileNotFoundError(f"PRCC: expected {folder}")
        for pid_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            pid = int(pid_dir.name)
            for p in _images(pid_dir):
                # A and B share clothes; C shows other clothes.
                clothes = 2 * pid + (1 if cam_folder == "C" else 0)
                items.append(EvalItem(pid, camid, clothes, item_id=f"{cam_folder}/{pid_dir.name}/{p.name}", path=str(p)))
        return items

    gallery = parse("A", 0)
    return [
        ReIDSplit("prcc_same_clothes", parse("B", 1), gallery),
        ReIDSplit("prcc_clothes_changing", parse("C", 2), gallery),
    ]


@dataclass
class WebBodyRoles:
    """Query / gallery positions of a streamed WebBody-test set (indices into the streamed order)."""

    query: list[int]
    gallery: list[int]
    notes: dict = field(default_factory=dict)


def webbody_query_gallery(labels: list[int], keys: list[str], roles: list[str | None]) -> WebBodyRoles:
    """Query/gallery from the shard records' metadata only (no images): the bundle's `role` where an identity
    has one, else one query per identity with >= 2 images (smallest key hash) and the rest gallery."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    query: list[int] = []
    gallery: list[int] = []
    singletons = 0
    for label in sorted(by_label):
        idx = sorted(by_label[label], key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
        if any(roles[i] in ("query", "gallery") for i in idx):
            query.extend(i for i in idx if roles[i] == "query")
            gallery.extend(i for i in idx if roles[i] != "query")
            continue
        if len(idx) < 2:
            singletons += 1
            gallery.extend(idx)  # still a distractor for everyone else
            continue
        query.append(idx[0])
        gallery.extend(idx[1:])
    return WebBodyRoles(query, gallery, {"identities_without_pair": singletons})


LOADERS = {
    "market1501": load_market1501,
    "ltcc": load_ltcc,
    "prcc": load_prcc,
}
