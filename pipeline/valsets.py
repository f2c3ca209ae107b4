"""Validation-set identity centers (`webbody valsets build`), for the clean stage's overlap removal.

Two sources, the files people actually have:
- insightface verification `.bin` files (LFW, CPLFW, CFP-FP, AgeDB-30, CALFW): a pickle of (encoded
  112x112 aligned face images, same/different flags). Identities are not labelled there, so each image is
  its own center; each same-identity pair adds the center of its two images. The images are already
  aligned: they are embedded directly.
- image folders with one sub-folder per identity: every photo goes through the faces stage's detector
  (best face), the ArcFace-template alignment and the embedder; an identity's center is the sum of its raw
  features (the clean stage's default "norm" weighting), normalised.
The center file (schemas/clean.py VALSET_CENTERS) records the set, the embedder and its config on every
row; the clean stage refuses a file made with another embedder.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from pipeline.clean.state import normalise
from pipeline.config import FacesConfig
from pipeline.faces.align import ARCFACE_112
from pipeline.faces.embedders import FaceCrop
from pipeline.faces.photos import photo_faces
from pipeline.shards import atomic_write_parquet
from pipeline.stage import StageError
from schemas.clean import VALSET_CENTERS
from schemas.imaging import decode_image

log = logging.getLogger(__name__)

KNOWN_SETS = ("lfw", "cplfw", "cfp_fp", "agedb_30", "calfw")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
# Where the face sits in an ArcFace-aligned 112x112 image (eyebrows to chin, from the template landmarks):
# the box embedders that align by themselves (dlib) need, since .bin images come without one.
ALIGNED_BOX = np.array([16.0, 30.0, 96.0, 110.0], np.float32)


class _BinUnpickler(pickle.Unpickler):
    """Verification .bin files are pickles from the web: allow only the containers and arrays they use."""

    ALLOWED = {
        ("builtins", "list"), ("builtins", "tuple"), ("builtins", "bytes"), ("builtins", "bytearray"),
        ("builtins", "bool"), ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a verification .bin file")
        return super().find_class(module, name)


def read_bin(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """(encoded images, same-identity flags of consecutive pairs) of an insightface verification .bin."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            data = _BinUnpickler(fh, encoding="bytes").load()
        bins, issame = data
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise StageError(f"{p} is not an insightface verification .bin (pickle of images, flags): {exc}") from exc
    images = [bytes(b) if not isinstance(b, np.ndarray) else b.tobytes() for b in bins]
    return images, [bool(x) for x in issame]


def write_bin(path: str | Path, images: list[bytes], issame: list[bool]) -> None:
    """Write the insightface .bin layout (used by tests and to package small custom sets)."""
    buf = io.BytesIO()
    pickle.dump((list(images), list(issame)), buf, protocol=4)
    Path(path).write_bytes(buf.getvalue())


def _decode(data: bytes) -> np.ndarray | None:
    return decode_image(data)


class ValsetEmbedder:
    """The faces stage's detector and embedder, loaded once, applied to validation images."""

    def __init__(self, faces: FacesConfig):
        from pipeline.faces.stage import FacesStage

        self.config = faces
        stage = FacesStage(faces)
        stage.setup()
        self.detector, self.embedder = stage.detector, stage.embedder

    def aligned(self, images: list[np.ndarray]) -> np.ndarray:
        """Features of ArcFace-aligned faces (resized to 112 if needed)."""
        lms = ARCFACE_112.astype(np.float32)
        crops = []
        for img in images:
            if img.shape[:2] != (112, 112):
                img = cv2.resize(img, (112, 112), interpolation=cv2.INTER_AREA)
            crops.append(FaceCrop(img, lms, img, ALIGNED_BOX))
        return self.embedder.embed(crops)

    def photos(self, images: list[np.ndarray]) -> list[np.ndarray | None]:
        """Features of the best face of each photo; None where no face is found or alignment fails."""
        return [f.feature for f in photo_faces(self.detector, self.embedder, images, pick="best")]


def _embedder_config(faces: FacesConfig) -> str:
    keys = ("embedder", "embedder_model", "kprpe_size", "dlib_shape_predictor", "detector_model")
    dump = faces.model_dump(mode="json")
    return json.dumps({k: dump.get(k) for k in keys}, sort_keys=True)


def _centers_from_bin(path: Path, emb: ValsetEmbedder, batch: int, counts: Counter) -> tuple[list, list, list]:
    """One center per image, plus one per same-identity pair (images 2k and 2k+1 with issame[k]): a pair's
    center is the sum of its two raw features, a better estimate of the person than either image alone."""
    images, issame = read_bin(path)
    items, feats, sizes = [], [], []
    by_index: dict[int, np.ndarray] = {}
    for start in range(0, len(images), batch):
        decoded = [(start + k, _decode(b)) for k, b in enumerate(images[start:start + batch])]
        good = [(i, img) for i, img in decoded if img is not None]
        counts["decode_error"] += len(decoded) - len(good)
        if good:
            for (i, _), f in zip(good, emb.aligned([img for _, img in good])):
                items.append(f"img{i:05d}")
                feats.append(f)
                sizes.append(1)
                by_index[i] = f
    for k, same in enumerate(issame):
        if same and 2 * k in by_index and 2 * k + 1 in by_index:
            items.append(f"pair{k:05d}")
            feats.append(by_index[2 * k] + by_index[2 * k + 1])
            sizes.append(2)
    counts["images"] += len(images)
    return items, feats, sizes


def _centers_from_folder(root: Path, emb: ValsetEmbedder, batch: int, counts: Counter) -> tuple[list, list, list]:
    items, feats, sizes = [], [], []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in person.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        total = np.zeros(0, np.float32)
        n = 0
        for start in range(0, len(files), batch):
            decoded = [_decode(f.read_bytes()) for f in files[start:start + batch]]
            counts["images"] += len(decoded)
            counts["decode_error"] += sum(img is None for img in decoded)
            for f in emb.photos([img for img in decoded if img is not None]):
                if f is None:
                    counts["no_face"] += 1
                    continue
                total = f if n == 0 else total + f  # raw sum: the clean stage's "norm" center weighting
                n += 1
        if n == 0:
            counts["identities_without_face"] += 1
            continue
        items.append(person.name)
        feats.append(total)
        sizes.append(n)
    return items, feats, sizes


def write_centers(path: str | Path, name: str, embedder: str, embedder_config: str, items: list[str],
                  features: np.ndarray, sizes: list[int]) -> None:
    """Write a center file (features are normalised here) atomically."""
    n = len(items)
    table = pa.table({
        "set": pa.array([name] * n, pa.string()),
        "item": pa.array(items, pa.string()),
        "n_images": pa.array(sizes, pa.int32()),
        "embedder": pa.array([embedder] * n, pa.string()),
        "embedder_config": pa.array([embedder_config] * n, pa.string()),
        "center": pa.array(list(normalise(features)), pa.list_(pa.float32())),
    })
    atomic_write_parquet(Path(path), VALSET_CENTERS.validate(table, where=str(path)))


def build_valset_centers(name: str, source: str | Path, output: str | Path, faces: FacesConfig,
                         batch_size: int = 64, embedder: ValsetEmbedder | None = None) -> dict:
    """Compute and write the center file of one validation set; returns a small report."""
    src = Path(source)
    if not src.exists():
        raise StageError(f"validation source {src} not found: give an insightface .bin file or a folder with one "
                         "sub-folder per identity")
    if name not in KNOWN_SETS:
        log.warning("valsets: '%s' is not one of %s; building it anyway", name, ", ".join(KNOWN_SETS))
    emb = embedder or ValsetEmbedder(faces)
    counts: Counter = Counter()
    if src.is_dir():
        items, feats, sizes = _centers_from_folder(src, emb, batch_size, counts)
    else:
        items, feats, sizes = _centers_from_bin(src, emb, batch_size, counts)
    if not items:
        raise StageError(f"no usable face in {src} ({dict(counts)}): nothing to write")
    write_centers(output, name, emb.embedder.name, _embedder_config(faces), items, np.stack(feats), sizes)
    report = {"set": name, "source": str(src), "output": str(output), "embedder": emb.embedder.name,
              "centers": len(items), **dict(sorted(counts.items()))}
    log.info("valsets: %s", report)
    return report
