"""Splits of the bundle: WebBody-test (identities disjoint from training, with query/gallery) and train subsets.

The official recipe (S: tasks/WebBody/j_make_split_face_body/make_subset_config.py, seed 42):
- "hard" image = lower body visible (any of COCO keypoints 10..16: right wrist, hips, knees, ankles) AND a
  partial face (not all of keypoints 0..4 visible). Visible = keypoint confidence >= KEYPOINT_VISIBLE
  (the official code tested coordinates > 0; we keep the pose model's confidence, see schemas/sample.py).
- An identity is eligible for test when min_hard < #hard < max_hard and min_images < #images < max_images
  (30/70/30/150 by default: `BundleConfig`, pipeline/config.py, holds every default of this module); `test_identities` of the eligible ones are drawn without replacement. If fewer
  are eligible, all of them are taken and the shortfall is reported in stats.json (never silently).
- Train = every other identity. "Frequent" = the top `frequent_fraction` (0.48) of training identities by
  image count (ties by identity id). Subsets: "12m" = random 70 % of frequent, "4m" = random 25 % of
  frequent (independent draws, so 4m is not nested in 12m, as upstream), "4m_random" = random 23 % of all
  training identities. Subsets are membership lists (index column `subsets`), not copies of the shards.

Query/gallery of WebBody-test (the official construction of webbody_test_25 is not in the released code; this
is ours): per test identity, ceil(query_fraction * #hard) of its hard images (at least 1, at most
#images - 1) are queries, drawn with the split seed; every other image of the identity is gallery. Queries are
therefore body-centric images where the face alone is not enough. Camera ids are not defined (-1): the
evaluator ignores cameras, and the clean stage already keeps at most one detection per photo.

Everything is drawn from one `numpy.random.default_rng(seed)` over identities in sorted order, so the same
selection gives the same splits on every run and machine. Labels are contiguous per split (0..K-1 over the
split's identities in sorted order), like upstream's re-labelling per subset.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import BundleConfig
from schemas.sample import KEYPOINT_VISIBLE

LOWER_BODY = range(10, 17)
FACE_POINTS = range(0, 5)


def is_hard(conf: list[float]) -> bool:
    """Lower body visible and a partial face, from 17 keypoint confidences."""
    lower = any(conf[i] >= KEYPOINT_VISIBLE for i in LOWER_BODY)
    full_face = all(conf[i] >= KEYPOINT_VISIBLE for i in FACE_POINTS)
    return lower and not full_face


@dataclass
class SplitPlan:
    split_of: dict[str, str]  # identity -> "train" | "test"
    class_of: dict[str, int]  # identity -> contiguous class id within its split
    role_of: dict[str, str]  # test sample key -> "query" | "gallery"
    subsets_of: dict[str, list[str]]  # train identity -> subset names
    stats: dict = field(default_factory=dict)


def make_splits(identities: list[str], keys: list[str], hard: list[bool], rule: BundleConfig | None = None,
                ) -> SplitPlan:
    """`identities`, `keys`, `hard` are parallel, one entry per kept sample. `rule`: the bundle config's split
    fields (`test_*`, `seed`, `query_fraction`, `frequent_*`, `random_subsets`); their defaults, the official
    recipe's, are set once, in pipeline/config.py (`BundleConfig`)."""
    r = rule or BundleConfig()
    test_identities, seed, query_fraction, frequent_fraction = (r.test_identities, r.seed, r.query_fraction,
                                                                r.frequent_fraction)
    min_hard, max_hard, min_images, max_images = r.test_min_hard, r.test_max_hard, r.test_min_images, r.test_max_images
    samples: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for ident, key, h in zip(identities, keys, hard):
        samples[ident].append((key, bool(h)))
    ids = sorted(samples)
    for ident in ids:
        samples[ident].sort()
    rng = np.random.default_rng(seed)

    def n_hard(i: str) -> int:
        return sum(h for _, h in samples[i])

    eligible = [i for i in ids if min_hard < n_hard(i) < max_hard and min_images < len(samples[i]) < max_images
                and len(samples[i]) >= 2]
    n_test = min(test_identities, len(eligible))
    picked = rng.choice(len(eligible), size=n_test, replace=False) if n_test else np.array([], dtype=np.int64)
    test = sorted(eligible[int(j)] for j in picked)
    test_set = set(test)
    train = [i for i in ids if i not in test_set]

    role_of: dict[str, str] = {}
    for ident in test:
        items = samples[ident]
        cands = [k for k, h in items if h] or [k for k, _ in items]  # small builds may have no hard image
        n_q = min(max(1, math.ceil(query_fraction * len(cands))), len(items) - 1, len(cands))
        queries = {cands[int(j)] for j in rng.choice(len(cands), size=n_q, replace=False)}
        for k, _ in items:
            role_of[k] = "query" if k in queries else "gallery"

    by_count = sorted(train, key=lambda i: (-len(samples[i]), i))
    frequent = sorted(by_count[: int(frequent_fraction * len(train))])
    subsets_of: dict[str, list[str]] = {i: [] for i in train}
    subset_sizes: dict[str, int] = {}
    for pool, specs in ((frequent, r.frequent_subsets), (train, r.random_subsets)):
        for name in sorted(specs):
            n = int(specs[name] * len(pool))
            chosen = rng.choice(len(pool), size=n, replace=False) if n else []
            for j in chosen:
                subsets_of[pool[int(j)]].append(name)
            subset_sizes[name] = n
    for names in subsets_of.values():
        names.sort()

    class_of = {i: n for n, i in enumerate(train)}
    class_of.update({i: n for n, i in enumerate(test)})
    split_of = {i: "train" for i in train}
    split_of.update({i: "test" for i in test})
    stats = {
        "seed": seed,
        "identities": {"train": len(train), "test": len(test)},
        "test_identities_requested": test_identities,
        "test_identities_eligible": len(eligible),
        "test_identities_short": max(0, test_identities - len(eligible)),
        "frequent_identities": len(frequent),
        "subset_identities": subset_sizes,
        "queries": sum(1 for r in role_of.values() if r == "query"),
        "gallery": sum(1 for r in role_of.values() if r == "gallery"),
    }
    return SplitPlan(split_of, class_of, role_of, subsets_of, stats)
