"""Multi-domain labelled images for fine-tuning: the generic folder layout, keypoint sidecars, model inputs.

Layout: ``ROOT/<domain>/<identity>/<image>`` (jpg, jpeg, png, bmp). An optional ``ROOT/keypoints.json`` maps an
image's path relative to ROOT (``vis/0001/a.jpg``) to its 22 keypoints in *pixels of that image* (17 COCO body
points + 5 face landmarks, ArcFace order; ``-1`` = missing). Images without keypoints get them from a
``keypoint_fn(image) -> (22, 2)`` when one is passed (``flows/finetune.py`` passes the persons stage's pose
model; sapiensid itself never imports the pipeline), else they keep ``-1`` (the model then sees whole-image
tokens only) and are counted as ``no_keypoints``.

Coverage rules (counted in :attr:`DomainDataset.report`):

* a listed domain with no folder or no image is an error (nothing can be sampled or evaluated from it);
* an identity with fewer than ``min_images`` images over all its domains is dropped (``too_few_images``):
  a batch-hard triplet needs a second image of the same identity;
* an identity lacking some domain is counted (``missing_domain``) and dropped or kept per ``missing_domain``
  (``"drop"`` | ``"keep"``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from sapiensid.data.transforms import (
    AugmentConfig,
    augment,
    foreground_mask_white,
    normalise_keypoints,
    square_pad_resize,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
KEYPOINTS_FILE = "keypoints.json"
KeypointFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class DomainImage:
    path: Path
    identity: str
    domain: str
    camera: int = -1  # camera id where the source has one (LLCM), else -1
    keypoints: tuple[tuple[float, float], ...] | None = None  # 22 pixel points of the original image


@dataclass
class DomainDataset:
    """Images with an identity label (0..n-1 in sorted identity order) and a domain index."""

    images: list[DomainImage]
    domains: list[str]
    identities: list[str] = field(default_factory=list)
    report: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identities:
            self.identities = sorted({im.identity for im in self.images})
        index = {name: i for i, name in enumerate(self.identities)}
        dindex = {d: i for i, d in enumerate(self.domains)}
        unknown = sorted({im.domain for im in self.images} - set(dindex))
        if unknown:
            raise ValueError(f"images in domain(s) {unknown} that are not among the dataset domains {self.domains}")
        self.labels = np.array([index[im.identity] for im in self.images], dtype=np.int64)
        self.domain_ids = np.array([dindex[im.domain] for im in self.images], dtype=np.int64)
        # cells[label][domain] -> indices of that identity's images in that domain
        self.cells: list[list[np.ndarray]] = [[np.zeros(0, np.int64) for _ in self.domains] for _ in self.identities]
        for lab in range(len(self.identities)):
            mine = np.flatnonzero(self.labels == lab)
            for d in range(len(self.domains)):
                self.cells[lab][d] = mine[self.domain_ids[mine] == d]

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.images)

    def domain_index(self, name: str) -> int:
        if name not in self.domains:
            raise ValueError(f"unknown domain {name!r}; this dataset has {self.domains}")
        return self.domains.index(name)


def filter_coverage(
    images: list[DomainImage], domains: Sequence[str], missing_domain: str = "drop", min_images: int = 2,
    where: str = "dataset",
) -> DomainDataset:
    """Apply the coverage rules of the module docstring and build the dataset (with its counts)."""
    if missing_domain not in ("drop", "keep"):
        raise ValueError(f"missing_domain must be 'drop' or 'keep', got {missing_domain!r}")
    domains = list(domains)
    for d in domains:
        if not any(im.domain == d for im in images):
            raise ValueError(f"{where}: domain {d!r} has no images (empty domain); remove it from `domains` "
                             "or add its images")
    by_id: dict[str, list[DomainImage]] = {}
    for im in images:
        by_id.setdefault(im.identity, []).append(im)
    report = {"identities_found": len(by_id), "images_found": len(images), "too_few_images": 0,
              "missing_domain": 0, "missing_domain_dropped": 0}
    kept: list[DomainImage] = []
    for ident in sorted(by_id):
        ims = by_id[ident]
        if len(ims) < min_images:
            report["too_few_images"] += 1
            log.warning("%s: identity %s has %d image(s) (< %d): dropped", where, ident, len(ims), min_images)
            continue
        if {im.domain for im in ims} != set(domains):
            report["missing_domain"] += 1
            if missing_domain == "drop":
                report["missing_domain_dropped"] += 1
                continue
        kept.extend(ims)
    if not kept:
        raise ValueError(f"{where}: no identity left after the coverage rules ({report})")
    report["identities"] = len({im.identity for im in kept})
    report["images"] = len(kept)
    return DomainDataset(kept, domains, report=report)


def read_sidecar(root: Path) -> dict[str, list[list[float]]]:
    path = root / KEYPOINTS_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping image paths to 22 [x, y] points")
    for key, pts in data.items():
        if np.asarray(pts, dtype=np.float64).shape != (22, 2):
            raise ValueError(f"{path}: {key!r} must hold 22 [x, y] points")
    return data


def read_folder(
    root: str | Path, domains: Sequence[str] | None = None, missing_domain: str = "drop", min_images: int = 2,
) -> DomainDataset:
    """The generic ``ROOT/<domain>/<identity>/<image>`` layout (domains: the given list, else every folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"fine-tune data root not found: {root}")
    if domains is None:
        domains = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not domains:
            raise ValueError(f"{root}: no domain folders (expected ROOT/<domain>/<identity>/<image>)")
    sidecar = read_sidecar(root)
    images = []
    for d in domains:
        for ident_dir in sorted((root / d).glob("*")) if (root / d).is_dir() else []:
            if not ident_dir.is_dir():
                continue
            for f in sorted(ident_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    rel = f.relative_to(root).as_posix()
                    kps = sidecar.get(rel)
                    images.append(DomainImage(f, ident_dir.name, d, -1,
                                              tuple(map(tuple, kps)) if kps is not None else None))  # type: ignore[arg-type]
    return filter_coverage(images, domains, missing_domain, min_images, where=str(root))


def write_keypoints(root: str | Path, points: dict[str, np.ndarray]) -> Path:
    """Merge pixel keypoints (relative path -> (22, 2)) into ``ROOT/keypoints.json``."""
    root = Path(root)
    data = read_sidecar(root)
    data.update({k: np.asarray(v, dtype=np.float64).round(2).tolist() for k, v in points.items()})
    path = root / KEYPOINTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: image does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class InputCache:
    """Model inputs of dataset images: white square pad + resize to the model size, keypoints from the sidecar
    or `keypoint_fn`. Decoded images are kept in memory when `cache` (small sets: 27 kB per 96 px image)."""

    def __init__(self, dataset: DomainDataset, size: int, keypoint_fn: KeypointFn | None = None, cache: bool = True):
        self.dataset, self.size, self.keypoint_fn, self.cache = dataset, size, keypoint_fn, cache
        self._store: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._no_keypoints: set[int] = set()

    @property
    def no_keypoints(self) -> int:
        """Images read so far that had no keypoints (sidecar or `keypoint_fn`)."""
        return len(self._no_keypoints)

    def base(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image S x S x 3 uint8, pixel keypoints (22, 2) of that image)."""
        if i in self._store:
            return self._store[i]
        item = self.dataset.images[i]
        img = read_image(item.path)
        if item.keypoints is not None:
            pts = np.asarray(item.keypoints, dtype=np.float32)
        elif self.keypoint_fn is not None:
            pts = np.asarray(self.keypoint_fn(img), dtype=np.float32)
        else:
            pts = np.full((22, 2), -1.0, np.float32)
            self._no_keypoints.add(i)
        out = square_pad_resize(img, pts, self.size)
        if self.cache:
            self._store[i] = out
        return out

    def batch(self, indices: Sequence[int], rng: np.random.Generator | None = None,
              aug: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images B x S x S x 3 uint8, masks B x S x S, keypoints B x 22 x 2 in [0, 1]); augmented when `aug`."""
        imgs, masks, kps = [], [], []
        for i in indices:
            img, pts = self.base(int(i))
            if aug is not None and rng is not None:
                img, pts = augment(img, pts, self.size, rng, aug)
            imgs.append(img)
            masks.append(foreground_mask_white(img))
            kps.append(normalise_keypoints(pts, self.size))
        return np.stack(imgs), np.stack(masks), np.stack(kps)
