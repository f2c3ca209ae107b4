"""Synthetic faces tables for testing and benchmarking the clean stage without any model.

A person is a random unit direction; a photo of them is that direction plus isotropic noise, so its cosine
to the person is about 1 / sqrt(1 + spread^2) and two photos are about that squared apart. Rows match
`schemas/faces.py` exactly (raw float16 features with their norm), so the real loader reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.clean.state import normalise
from pipeline.rollup import write_rollup
from pipeline.shards import DatasetDir, format_shard_id
from schemas.faces import FACES


def people(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """`n` random unit directions (random directions in high dimension are nearly orthogonal)."""
    return normalise(rng.standard_normal((n, dim)))


def photos(rng: np.random.Generator, centers: np.ndarray, spread: float | np.ndarray) -> np.ndarray:
    """One noisy photo of each row of `centers` (normalised)."""
    noise = rng.standard_normal(centers.shape) / np.sqrt(centers.shape[1])
    return normalise(centers + np.reshape(spread, (-1, 1)) * noise)


def at_cosine(rng: np.random.Generator, base: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at exactly cosine `cos` to the unit vector `base`."""
    ortho = rng.standard_normal(base.shape)
    ortho -= ortho.dot(base) * base
    ortho /= np.linalg.norm(ortho)
    return cos * base + np.sqrt(1 - cos * cos) * ortho


@dataclass
class FaceRows:
    """Column lists of a faces table under construction, plus the ground truth of each row."""

    embedder: str = "kprpe"
    cols: dict[str, list] = field(default_factory=lambda: {n: [] for n in FACES.schema.names})
    truth: list[str] = field(default_factory=list)  # the real person of each row

    def add(self, label: str, photo: str, feature: np.ndarray, truth: str, *, detection: int = 0,
            face_score: float = 0.99, norm: float = 20.0, name: str | None = None) -> str:
        raw = (np.asarray(feature, dtype=np.float32) * norm).astype("<f2")
        person_id = f"{photo}_{detection}"
        c = self.cols
        c["person_id"].append(person_id)
        c["sample_id"].append(photo)
        c["detection_index"].append(detection)
        c["source_label"].append(label)
        c["name"].append(name or label)
        c["face_box"].append([10.0, 10.0, 60.0, 60.0])
        c["face_landmarks"].append([25.0, 30.0, 45.0, 30.0, 35.0, 40.0, 28.0, 50.0, 42.0, 50.0])
        c["face_score"].append(face_score)
        c["face_size_px"].append(50.0)
        c["feature"].append(raw.tobytes())
        c["feature_dim"].append(len(raw))
        c["feature_norm"].append(float(np.linalg.norm(raw.astype(np.float32))))
        c["embedder"].append(self.embedder)
        self.truth.append(truth)
        return person_id

    def __len__(self) -> int:
        return len(self.truth)

    def table(self, rows: slice | np.ndarray | None = None) -> pa.Table:
        idx = np.arange(len(self))[rows] if rows is not None else np.arange(len(self))
        cols = {n: pa.array([v[i] for i in idx], type=FACES.schema.field(n).type) for n, v in self.cols.items()}
        return FACES.validate(pa.table(cols))


def write_faces_dir(root: str | Path, tables: list[pa.Table]) -> DatasetDir:
    """A finished faces dataset directory (shards, markers, roll-up) holding `tables` as shards 0..n-1."""
    d = DatasetDir(root)
    ids = []
    for k, table in enumerate(tables):
        sid = format_shard_id(k)
        d.commit_shard(sid, table, {"stage": "faces", "shard": sid, "rows_in": table.num_rows,
                                    "rows_out": table.num_rows, "drops": {}, "seconds": 0.0})
        ids.append(sid)
    write_rollup(d, "faces", ids)
    return d
