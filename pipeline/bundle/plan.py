"""Pass 1 of the bundle: the clean selection joined to persons/faces metadata (no image bytes), the splits,
the per-identity face centers, and the sample -> shard -> pack task assignment.

Linear in shards: each input folder is listed once (names and sizes), and each shard's marker is read at most
once (`ShardSet`), so planning S shards costs 3 listings and <= 3 S marker reads.

Order: input shards are grouped into windows of `bundle.pack_window` consecutive shard ids; within a window
and split, samples are ordered by sha256(seed:key), i.e. shuffled across the window's shards with a fixed
seed, and cut into bundle shards of `samples_per_shard` (the last shard of a window may be smaller). One pack
task per window reads every input row group of its window once and writes all of the window's shards, so the
input is read once whatever the shuffle (a bundle shard drawing from W input shards would otherwise read each
of them again). Shard numbers run on across windows.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.bundle.layout import SPLITS, key_hash, shard_file
from pipeline.bundle.splits import SplitPlan, is_hard, make_splits
from pipeline.bundle.store import Store, as_store
from pipeline.bundle.writers import get_writer
from pipeline.config import BundleConfig
from pipeline.stage import StageError

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def sample_key(person_id: str) -> str:
    """WebDataset keys end at the first dot and should be file-name safe; person ids usually already are.
    USTAR names hold 100 bytes, so an id too long for `<key>.face.npy` becomes a stable hash of itself."""
    key = _KEY_BAD.sub("-", person_id)
    return key if len(key) <= 80 else hashlib.sha256(person_id.encode()).hexdigest()[:40]


class ShardSet:
    """The finished shards of a stage's folder (the stage contract of `pipeline.shards`), from one listing.

    A shard is finished when its parquet and its `.done` marker are listed and the marker names the listed
    parquet size; markers are read lazily, once, and only for the shards asked about.
    """

    def __init__(self, root: str | Store, vouched: dict[str, int] | None = None):
        """`vouched`: shard id -> parquet size, from a planner that already checked those shards' markers
        (a pack task gets them with its window): no listing and no marker read; the reader checks the
        size of the parquet it opens instead (`check_size`)."""
        self.store = as_store(root)
        self.vouched = vouched
        if vouched is None:
            self.files = self.store.listing()
            self._done: dict[str, bool] = {}
        else:
            self.files = {n: v for sid, size in vouched.items()
                          for n, v in ((f"part-{sid}.parquet", size), (f"part-{sid}.done", 0))}
            self._done = dict.fromkeys(vouched, True)

    def verified(self) -> dict[str, int]:
        """Shard id -> parquet size of every shard whose marker was read and matched (for `vouched`)."""
        return {sid: self.files[f"part-{sid}.parquet"] for sid, ok in sorted(self._done.items()) if ok}

    def check_size(self, sid: str, actual: int) -> None:
        expected = self.files.get(f"part-{sid}.parquet")
        if expected != actual:
            raise StageError(f"{self.store.url(self.parquet_name(sid))} is {actual} bytes, but its marker said "
                             f"{expected} when the bundle was planned: the input changed during the run; run "
                             "the bundle again")

    def ids(self) -> list[str]:
        """Ids with a parquet and a marker listed (the marker's content not yet checked)."""
        return sorted(m.group(1) for n in self.files if (m := _PART.match(n)) and f"part-{m.group(1)}.done" in self.files)

    def is_done(self, sid: str) -> bool:
        if sid not in self._done:
            ok = f"part-{sid}.parquet" in self.files and f"part-{sid}.done" in self.files
            if ok:
                try:
                    ok = self.store.read_json(f"part-{sid}.done").get("bytes") == self.files[f"part-{sid}.parquet"]
                except (OSError, ValueError):
                    ok = False
            self._done[sid] = ok
        return self._done[sid]

    def done_ids(self) -> list[str]:
        return [s for s in self.ids() if self.is_done(s)]

    def parquet_name(self, sid: str) -> str:
        return f"part-{sid}.parquet"

    def read(self, sid: str, columns: list[str]) -> pa.Table | None:
        if not self.is_done(sid):
            return None
        # Through a random-access file: only the asked columns' chunks are read (ranged GETs on object stores).
        with self.store.open(self.parquet_name(sid)) as fh:
            self.check_size(sid, fh.seek(0, 2))
            fh.seek(0)
            return pq.ParquetFile(fh).read(columns=columns)


@dataclass
class Planned:
    key: str
    person_id: str
    in_shard: str
    identity: str
    split: str = ""
    class_id: int = -1  # contiguous class of the identity within its split
    role: str = "train"
    subsets: list[str] = field(default_factory=list)
    shard: str = ""
    position: int = 0
    window: int = 0


@dataclass
class BundlePlan:
    samples: list[Planned]
    splits: SplitPlan
    centers: dict[str, tuple[np.ndarray, int, str]]  # identity -> (sum of raw features, count, embedder)
    rows_in: int
    drops: Counter
    # "clean"/"persons"/"faces" -> shard id -> parquet size, for the input shards whose markers planning checked
    verified: dict[str, dict[str, int]] = field(default_factory=dict)
    inputs: dict[int, list[str]] = field(default_factory=dict)  # window -> its input shard ids
    first: dict[int, dict[str, int]] = field(default_factory=dict)  # window -> split -> its first shard number

    def by_window(self) -> dict[int, list[Planned]]:
        out: dict[int, list[Planned]] = {}
        for s in self.samples:
            out.setdefault(s.window, []).append(s)
        return out

    def digest(self) -> str:
        return samples_digest(self.samples)

    def window_payload(self, window: int, samples: list[Planned], removed: set[str]) -> dict:
        """What a pack task needs to re-derive its window's part of the plan from its inputs (plan_window):
        per identity of the window its split, class id and subsets, the test samples that are queries, where the
        window's shard numbers start, and the input shards' sizes planning checked. Per identity, not per
        sample: the samples themselves are re-read from the clean and persons shards the task reads anyway."""
        ins = self.inputs[window]
        idents: dict[str, list] = {}
        for s in samples:
            idents.setdefault(s.identity, [s.split, s.class_id, s.subsets])
        return {
            "window": window,
            "inputs": ins,
            "first": self.first[window],
            "identities": dict(sorted(idents.items())),
            "queries": sorted(s.key for s in samples if s.role == "query"),
            "removed": sorted(h for s in samples if (h := key_hash(s.key)) in removed) if removed else [],
            "vouched": {k: {sid: sizes[sid] for sid in ins if sid in sizes} for k, sizes in sorted(self.verified.items())},
            "digest": samples_digest(samples),
        }


def samples_digest(samples: list[Planned]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.key}|{s.identity}|{s.split}|{s.class_id}|{s.role}|{','.join(s.subsets)}|{s.shard}|"
                 f"{s.position}|{s.window}\n".encode())
    return h.hexdigest()[:16]


def shard_samples(cset: ShardSet, pset: ShardSet, sid: str, window: int) -> tuple[list[tuple[Planned, list]], int, int]:
    """The kept samples of input shard `sid` (with their crop keypoints), its kept rows, and how many of those
    have no persons row. The planner and each pack task derive a window's samples with this one function."""
    sel = cset.read(sid, ["person_id", "identity", "kept"])
    if sel is None:
        raise StageError(f"clean shard {sid} of {cset.store} is not finished")
    sel = sel.filter(pc.and_(pc.equal(sel.column("kept"), True), pc.is_valid(sel.column("identity"))))
    if not sel.num_rows:
        return [], 0, 0
    ptab = pset.read(sid, ["person_id", "keypoints_crop"])
    kps = dict(zip(ptab.column("person_id").to_pylist(), ptab.column("keypoints_crop").to_pylist())) if ptab else {}
    out, missing = [], 0
    for pid, ident in zip(sel.column("person_id").to_pylist(), sel.column("identity").to_pylist()):
        kp = kps.get(pid)
        if kp is None:
            missing += 1
            continue
        out.append((Planned(sample_key(pid), pid, sid, ident, window=window), kp))
    return out, sel.num_rows, missing


def assign_window(samples: list[Planned], cfg: BundleConfig, first: dict[str, int]) -> list[Planned]:
    """Order one window's samples (split, then sha256(seed:key)) and cut them into shards of
    `samples_per_shard` numbered from `first[split]`; returns them in shard order (train first)."""
    extension = get_writer(cfg.writer).extension
    ordered: list[Planned] = []
    for split in SPLITS:
        part = sorted((s for s in samples if s.split == split),
                      key=lambda s: hashlib.sha256(f"{cfg.seed}:{s.key}".encode()).hexdigest())
        for i, s in enumerate(part):
            s.shard = shard_file(split, first[split] + i // cfg.samples_per_shard, extension)
            s.position = i % cfg.samples_per_shard
        ordered.extend(part)
    return ordered


def shards_of(n_samples: int, cfg: BundleConfig) -> int:
    return -(-n_samples // cfg.samples_per_shard)


def build_plan(cfg: BundleConfig, clean: str | Store, persons: str | Store, faces: str | Store,
               removed: set[str] | frozenset[str] = frozenset()) -> BundlePlan:
    """The plan. `removed`: hashed keys of samples opted out (`_removed.json`): they keep their place in the
    splits and shards (so every other sample keeps its shard and position) but add nothing to the centers."""
    cset, pset, fset = ShardSet(clean), ShardSet(persons), ShardSet(faces)
    clean_ids = cset.done_ids()
    if not clean_ids:
        raise StageError(f"no finished clean shards in {cset.store}: run the clean stage first")
    samples: list[Planned] = []
    hard: list[bool] = []
    centers: dict[str, tuple[np.ndarray, int, str]] = {}
    drops: Counter = Counter()
    rows_in = 0
    seen: dict[str, str] = {}
    inputs: dict[int, list[str]] = {}
    for i, sid in enumerate(clean_ids):
        inputs.setdefault(i // cfg.pack_window, []).append(sid)
        found, kept, missing = shard_samples(cset, pset, sid, i // cfg.pack_window)
        rows_in += kept
        if missing:
            drops["missing_person"] += missing
        if not found:
            continue
        ftab = fset.read(sid, ["person_id", "feature", "feature_dim", "embedder"])
        feats = {r["person_id"]: r for r in ftab.to_pylist()} if ftab is not None else {}
        for s, kp in found:
            if s.key in seen:
                raise StageError(f"two kept samples share the key '{s.key}' ({seen[s.key]} and {s.person_id}): "
                                 "person ids must be unique across the clean selection")
            seen[s.key] = s.person_id
            samples.append(s)
            hard.append(is_hard(kp[2::3]) if len(kp) == 51 else False)
            f = feats.get(s.person_id)
            if f is not None and not (removed and key_hash(s.key) in removed):
                vec = np.frombuffer(f["feature"], dtype="<f2").astype(np.float32)
                if vec.size == f["feature_dim"] and np.all(np.isfinite(vec)):
                    old = centers.get(s.identity)
                    if old is None:
                        centers[s.identity] = (vec.copy(), 1, f["embedder"])
                    else:
                        centers[s.identity] = (old[0] + vec, old[1] + 1, old[2])
    splits = make_splits([s.identity for s in samples], [s.key for s in samples], hard, cfg)
    by_window: dict[int, list[Planned]] = {}
    for s in samples:
        s.split = splits.split_of[s.identity]
        s.class_id = splits.class_of[s.identity]
        # "train" rather than null: JSON readers that infer one type per field (HF datasets) need a string.
        s.role = splits.role_of.get(s.key, "train")
        s.subsets = list(splits.subsets_of.get(s.identity, []))
        by_window.setdefault(s.window, []).append(s)
    # Shard numbers run on across windows: a window's first shard of a split follows the last window's.
    ordered: list[Planned] = []
    first: dict[int, dict[str, int]] = {}
    nxt = dict.fromkeys(SPLITS, 0)
    for w in sorted(inputs):
        first[w] = dict(nxt)
        part = assign_window(by_window.get(w, []), cfg, nxt)
        for split in SPLITS:
            nxt[split] += shards_of(sum(1 for s in part if s.split == split), cfg)
        ordered.extend(part)
    return BundlePlan(ordered, splits, centers, rows_in, drops,
                      verified={"clean": cset.verified(), "persons": pset.verified(), "faces": fset.verified()},
                      inputs=inputs, first=first)


def plan_window(payload: dict, cfg: BundleConfig, clean: str | Store, persons: str | Store) -> list[Planned]:
    """A pack task's window of the plan, re-derived from its inputs and its payload (BundlePlan.window_payload),
    checked against the digest the planner computed: an input changed since planning is a clear error."""
    vouched = payload["vouched"]
    cset, pset = ShardSet(clean, vouched.get("clean")), ShardSet(persons, vouched.get("persons"))
    idents, queries = payload["identities"], set(payload["queries"])
    samples: list[Planned] = []
    for sid in payload["inputs"]:
        for s, _ in shard_samples(cset, pset, sid, payload["window"])[0]:
            if s.identity not in idents:
                raise StageError(f"bundle window {payload['window']}: identity {s.identity} of input shard {sid} "
                                 "was not planned: the inputs changed during the run; run the bundle again")
            s.split, s.class_id, subsets = idents[s.identity]
            s.subsets = list(subsets)
            s.role = "train" if s.split == "train" else ("query" if s.key in queries else "gallery")
            samples.append(s)
    ordered = assign_window(samples, cfg, dict(payload["first"]))
    if samples_digest(ordered) != payload["digest"]:
        raise StageError(f"bundle window {payload['window']}: its samples differ from the plan (the inputs changed "
                         "during the run); run the bundle again")
    removed = set(payload["removed"])
    return [s for s in ordered if key_hash(s.key) not in removed] if removed else ordered
