"""Pass 1 of the bundle: the clean selection joined to persons/faces metadata (no image bytes), the splits,
the per-identity face centers, and the sample -> shard assignment.

Order within a split is (input shard id, sha256(seed:key)): a bundle shard draws its samples from a few
consecutive input shards (each pack task reads little), while samples inside it are pseudo-randomly mixed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bundle.splits import SplitPlan, is_hard, make_splits
from pipeline.config import BundleConfig
from pipeline.shards import DatasetDir
from pipeline.stage import StageError

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
SPLITS = ("train", "test")


def sample_key(person_id: str) -> str:
    """WebDataset keys end at the first dot and should be file-name safe; person ids usually already are.
    USTAR names hold 100 bytes, so an id too long for `<key>.face.npy` becomes a stable hash of itself."""
    key = _KEY_BAD.sub("-", person_id)
    return key if len(key) <= 80 else hashlib.sha256(person_id.encode()).hexdigest()[:40]


def shard_file(split: str, n: int) -> str:
    return f"webbody-{split}-{n:06d}.tar"


@dataclass
class Planned:
    key: str
    person_id: str
    in_shard: str
    identity: str
    split: str = ""
    label: int = -1
    role: str = "train"
    subsets: list[str] = field(default_factory=list)
    shard: str = ""
    position: int = 0


@dataclass
class BundlePlan:
    samples: list[Planned]
    splits: SplitPlan
    centers: dict[str, tuple[np.ndarray, int, str]]  # identity -> (sum of raw features, count, embedder)
    rows_in: int
    drops: Counter

    def by_shard(self) -> dict[str, list[Planned]]:
        out: dict[str, list[Planned]] = {}
        for s in self.samples:
            out.setdefault(s.shard, []).append(s)
        return out

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.key}|{s.identity}|{s.split}|{s.label}|{s.role}|{','.join(s.subsets)}|{s.shard}|"
                     f"{s.position}\n".encode())
        return h.hexdigest()[:16]


def _read(d: DatasetDir, sid: str, columns: list[str]) -> pa.Table | None:
    if sid not in d.done_ids():
        return None
    return pq.read_table(d.parquet(sid), columns=columns)


def build_plan(cfg: BundleConfig, clean: Path, persons: Path, faces: Path) -> BundlePlan:
    cdir, pdir, fdir = DatasetDir(clean), DatasetDir(persons), DatasetDir(faces)
    if not cdir.done_ids():
        raise StageError(f"no finished clean shards in {clean}: run the clean stage first")
    samples: list[Planned] = []
    hard: list[bool] = []
    centers: dict[str, tuple[np.ndarray, int, str]] = {}
    drops: Counter = Counter()
    rows_in = 0
    seen: dict[str, str] = {}
    for sid in cdir.done_ids():
        sel = pq.read_table(cdir.parquet(sid), columns=["person_id", "identity", "kept"])
        sel = sel.filter(pc.and_(pc.equal(sel.column("kept"), True), pc.is_valid(sel.column("identity"))))
        rows_in += sel.num_rows
        if not sel.num_rows:
            continue
        ptab = _read(pdir, sid, ["person_id", "keypoints_crop"])
        ftab = _read(fdir, sid, ["person_id", "feature", "feature_dim", "embedder"])
        kps = dict(zip(ptab.column("person_id").to_pylist(), ptab.column("keypoints_crop").to_pylist())) if ptab else {}
        feats = {r["person_id"]: r for r in ftab.to_pylist()} if ftab is not None else {}
        for pid, ident in zip(sel.column("person_id").to_pylist(), sel.column("identity").to_pylist()):
            kp = kps.get(pid)
            if kp is None:
                drops["missing_person"] += 1
                continue
            key = sample_key(pid)
            if key in seen:
                raise StageError(f"two kept samples share the key '{key}' ({seen[key]} and {pid}): person ids "
                                 "must be unique across the clean selection")
            seen[key] = pid
            samples.append(Planned(key, pid, sid, ident))
            hard.append(is_hard(kp[2::3]) if len(kp) == 51 else False)
            f = feats.get(pid)
            if f is not None:
                vec = np.frombuffer(f["feature"], dtype="<f2").astype(np.float32)
                if vec.size == f["feature_dim"] and np.all(np.isfinite(vec)):
                    old = centers.get(ident)
                    if old is None:
                        centers[ident] = (vec.copy(), 1, f["embedder"])
                    else:
                        centers[ident] = (old[0] + vec, old[1] + 1, old[2])
    splits = make_splits(
        [s.identity for s in samples], [s.key for s in samples], hard,
        test_identities=cfg.test_identities, seed=cfg.seed, min_hard=cfg.test_min_hard,
        max_hard=cfg.test_max_hard, min_images=cfg.test_min_images, max_images=cfg.test_max_images,
        query_fraction=cfg.query_fraction, frequent_fraction=cfg.frequent_fraction,
        frequent_subsets=cfg.frequent_subsets, random_subsets=cfg.random_subsets,
    )
    for s in samples:
        s.split = splits.split_of[s.identity]
        s.label = splits.label_of[s.identity]
        # "train" rather than null: JSON readers that infer one type per field (HF datasets) need a string.
        s.role = splits.role_of.get(s.key, "train")
        s.subsets = list(splits.subsets_of.get(s.identity, []))
    ordered: list[Planned] = []
    for split in SPLITS:
        part = [s for s in samples if s.split == split]
        part.sort(key=lambda s: (s.in_shard, hashlib.sha256(f"{cfg.seed}:{s.key}".encode()).hexdigest()))
        for i, s in enumerate(part):
            s.shard = shard_file(split, i // cfg.samples_per_shard)
            s.position = i % cfg.samples_per_shard
        ordered.extend(part)
    return BundlePlan(ordered, splits, centers, rows_in, drops)
