"""A hard synthetic web-name scenario for the clean quality benchmark, with its ground truth.

Built so that the easy cases of `synthetic.py` are gone:

- impostors live in demographic groups: people share a common face component and a group component, so two
  photos of different people of one group are at cosine ~0.2-0.35 (`impostor_cos`), across groups lower;
- a person's photos fall into 1-3 pose/age sub-modes, and a share of them (`tail`) is much noisier: the
  genuine distribution has a long low-similarity tail reaching into the impostors';
- a name is `noise` (50-70 % in the hard setting) other people: a co-star who appears beside the person in a
  large share of the person's photos (same photo, another detection) and alone, plus one-off strangers,
  half of them from the person's own group;
- bursts: runs of 3-5 distinct photos above 0.9 to each other that are not copies (they must be kept);
- re-encoded copies of a photo from another URL (one of each group must be kept, the rest are duplicates);
- alias names (a person under two names: must merge into one identity);
- validation sets: planted persons, each in one set only, as single-image centers or as the sum of three
  images, photographed with an age/domain shift; look-alike centers at cosine 0.6-0.75 to a person that is
  NOT planted (must not remove that person); random centers.

Ground truth per row: the person (`truth`), plus which rows a correct cleaner keeps (`expected`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.clean.state import normalise
from pipeline.clean.synthetic import FaceRows, at_cosine


@dataclass
class Setting:
    names: int = 400
    dim: int = 512
    groups: int = 8
    common: float = 0.10  # share of a face's energy in the common component (cross-group impostor cosine)
    group: tuple[float, float] = (0.33, 0.52)  # + the group component's share: within-group impostor cosine
    modes: tuple[int, int] = (1, 3)  # pose/age sub-modes per person
    mode_weight: float = 0.55  # a mode is the person plus this much of a random direction
    spread: tuple[float, float] = (0.45, 0.7)  # photo noise around the mode (larger: lower genuine cosine)
    tail: float = 0.12  # share of a person's photos with `tail_spread` x the noise
    tail_spread: float = 1.8
    photos: tuple[int, int] = (6, 40)  # distinct photos of the true person per name
    noise: tuple[float, float] = (0.5, 0.7)  # share of a name's rows that are other people
    costar_share: tuple[float, float] = (0.3, 0.6)  # share of the person's photos the co-star is in
    bursts: float = 0.15  # share of names with a burst of distinct photos above 0.9
    copies: float = 0.05  # chance a photo appears again from another URL (re-encoded)
    aliases: float = 0.03
    # Shares of persons planted in a validation set / given a look-alike validation center (from the others):
    # ~100 of each at 300 names, so that one miss is 0.01 and the overlap targets (recall 1, false removal
    # <= 0.01) can be told apart at all (at 4 % of 300 names one miss was 0.083).
    planted: float = 0.34
    lookalikes: float = 0.34
    lookalike_cos: tuple[float, float] = (0.6, 0.75)
    val_shift: float = 0.35  # age/domain shift of validation photos (weight of a random direction)
    random_centers: int = 2000


@dataclass
class Scenario:
    rows: FaceRows
    expected: set[str]  # person_ids a correct cleaner keeps (one per copy group)
    copies: dict[str, str]  # copy person_id -> original person_id
    planted: set[str]  # truths that must disappear
    lookalike: set[str]  # truths with a look-alike validation center (must stay)
    valsets: dict[str, np.ndarray]
    names: int
    stats: dict = field(default_factory=dict)
    # Per set, the person behind each center ("P<k>" planted or look-alike, None for a random center).
    val_owner: dict[str, list[str | None]] = field(default_factory=dict)
    # Images behind each center of a set: lfw is a .bin pair set (one image a center), agedb_30 folders of 3.
    val_images: dict[str, int] = field(default_factory=lambda: {"lfw": 1, "agedb_30": 3})
    # Per person ("P<k>"), what no cleaner sees: the person's direction, the noise-free center of its photos
    # (the normalised mean of its pose/age modes) and its number of modes; for bounds on the overlap rule.
    latent: dict[str, dict] = field(default_factory=dict)


def _person(rng: np.random.Generator, common: np.ndarray, group: np.ndarray, s: Setting, share: float) -> np.ndarray:
    own = normalise(rng.standard_normal((1, s.dim)))[0]
    return normalise((np.sqrt(s.common) * common + np.sqrt(share) * group
                      + np.sqrt(max(0.0, 1 - s.common - share)) * own)[None])[0]


def _photo(rng: np.random.Generator, center: np.ndarray, spread: float) -> np.ndarray:
    noise = rng.standard_normal(center.shape) / np.sqrt(center.shape[-1])
    return normalise((center + spread * noise)[None])[0]


class _People:
    """Persons with groups and sub-modes; photos of them."""

    def __init__(self, rng: np.random.Generator, s: Setting):
        self.rng, self.s = rng, s
        self.common = normalise(rng.standard_normal((1, s.dim)))[0]
        self.group_dirs = normalise(rng.standard_normal((s.groups, s.dim)))
        self.group_share = rng.uniform(*s.group, s.groups) - s.common

    def new(self) -> dict:
        g = int(self.rng.integers(self.s.groups))
        p = _person(self.rng, self.common, self.group_dirs[g], self.s, float(self.group_share[g]))
        n_modes = int(self.rng.integers(self.s.modes[0], self.s.modes[1] + 1))
        modes = [normalise((p + self.s.mode_weight * normalise(self.rng.standard_normal((1, self.s.dim)))[0])[None])[0]
                 for _ in range(n_modes)]
        return {"dir": p, "group": g, "modes": modes, "spread": float(self.rng.uniform(*self.s.spread))}

    def stranger(self, group: int | None = None) -> dict:
        if group is None:
            return self.new()
        p = _person(self.rng, self.common, self.group_dirs[group], self.s, float(self.group_share[group]))
        return {"dir": p, "group": group, "modes": [p], "spread": float(self.rng.uniform(*self.s.spread))}

    def photo(self, who: dict) -> np.ndarray:
        mode = who["modes"][int(self.rng.integers(len(who["modes"])))]
        spread = who["spread"] * (self.s.tail_spread if self.rng.random() < self.s.tail else 1.0)
        return _photo(self.rng, mode, spread)


def build(seed: int, s: Setting) -> Scenario:
    rng = np.random.default_rng(seed)
    ppl = _People(rng, s)
    persons = [ppl.new() for _ in range(s.names)]
    names = [(f"name{k:05d}", k) for k in range(s.names)]
    aliases = rng.choice(s.names, size=max(1, int(s.names * s.aliases)), replace=False)
    names += [(f"alias{int(k):05d}", int(k)) for k in aliases]
    pool = [k for k in range(s.names) if k not in set(aliases.tolist())]
    n_planted = max(2, int(s.names * s.planted))
    planted = [int(k) for k in rng.choice(pool, size=n_planted, replace=False)]
    rest = [k for k in range(s.names) if k not in set(planted)]
    lookalike = [int(k) for k in rng.choice(rest, size=max(1, int(s.names * s.lookalikes)), replace=False)]

    rows = FaceRows()
    expected: set[str] = set()
    copies: dict[str, str] = {}
    for name, who in names:
        person = persons[who]
        truth = f"P{who}"
        n_true = int(rng.integers(s.photos[0], s.photos[1] + 1))
        noise = float(rng.uniform(*s.noise))
        n_noise = int(round(n_true * noise / (1 - noise)))
        costar = ppl.new()
        n_with = min(n_noise, int(round(n_true * rng.uniform(*s.costar_share))))
        good: list[str] = []
        burst_left = int(rng.integers(3, 6)) if rng.random() < s.bursts else 0
        burst_center = None
        for i in range(n_true):
            photo = f"{name}_p{i:03d}"
            if burst_left:
                if burst_center is None:
                    burst_center = ppl.photo(person)
                f = _photo(rng, burst_center, 0.25)  # distinct photos of one moment: pairs above 0.9
                burst_left -= 1
            else:
                f = ppl.photo(person)
            score = float(rng.uniform(0.5, 0.95)) if rng.random() < 0.05 else float(rng.uniform(0.96, 1.0))
            pid = rows.add(name, photo, f, truth, face_score=score, norm=float(rng.uniform(15, 30)))
            if score > 0.95:
                good.append(pid)
            if i < n_with:  # the co-star beside the person, in the same photo
                rows.add(name, photo, ppl.photo(costar), f"costar_{name}", detection=1)
            if score > 0.95 and rng.random() < s.copies:
                cpid = rows.add(name, f"{name}_c{i:03d}", _photo(rng, f, 0.03), truth,
                                face_score=float(rng.uniform(0.96, 1.0)))
                copies[cpid] = pid
        n_left = n_noise - n_with
        n_solo = min(n_left, int(rng.integers(0, 4)))
        for i in range(n_solo):
            rows.add(name, f"{name}_s{i:03d}", ppl.photo(costar), f"costar_{name}")
        for i in range(n_left - n_solo):
            other = ppl.stranger(person["group"] if rng.random() < 0.5 else None)
            rows.add(name, f"{name}_n{i:03d}", ppl.photo(other), "stranger")
        if who not in planted and len(good) >= 2:
            expected.update(good)

    def val_photo(k: int) -> np.ndarray:
        shifted = normalise((persons[k]["dir"] + s.val_shift * normalise(rng.standard_normal((1, s.dim)))[0])[None])[0]
        return _photo(rng, shifted, persons[k]["spread"])

    half = len(planted) // 2
    single = np.stack([val_photo(k) for k in planted[:half]])  # .bin-style: one image, one center
    folder = np.stack([sum(val_photo(k) for _ in range(3)) for k in planted[half:]])  # folder: 3 images
    looks = np.stack([at_cosine(rng, persons[k]["dir"], float(rng.uniform(*s.lookalike_cos))) for k in lookalike])
    rand = lambda n: np.stack([ppl.stranger()["dir"] for _ in range(n)])  # noqa: E731
    valsets = {"lfw": np.concatenate([single, looks[: len(looks) // 2], rand(s.random_centers)]),
               "agedb_30": np.concatenate([folder, looks[len(looks) // 2:], rand(s.random_centers)])}
    owner = lambda ks: [f"P{k}" for k in ks]  # noqa: E731
    val_owner = {"lfw": owner(planted[:half]) + owner(lookalike[: len(looks) // 2]) + [None] * s.random_centers,
                 "agedb_30": owner(planted[half:]) + owner(lookalike[len(looks) // 2:]) + [None] * s.random_centers}
    latent = {f"P{k}": {"dir": p["dir"], "center": normalise(np.mean(p["modes"], axis=0)[None])[0],
                        "modes": len(p["modes"])} for k, p in enumerate(persons)}
    return Scenario(rows=rows, expected=expected, copies=copies, planted={f"P{k}" for k in planted},
                    lookalike={f"P{k}" for k in lookalike}, valsets=valsets, names=len(names), val_owner=val_owner,
                    latent=latent)


def pair_cosines(seed: int, s: Setting, n: int = 4000) -> dict[str, np.ndarray]:
    """Genuine (two photos of one person) and impostor (two people of one group / any group) cosines."""
    rng = np.random.default_rng(seed)
    ppl = _People(rng, s)
    gen, imp_group, imp_any = [], [], []
    for _ in range(n // 4):
        a = ppl.new()
        b = ppl.stranger(a["group"])
        c = ppl.new()
        pa = [ppl.photo(a) for _ in range(3)]
        gen += [float(pa[0] @ pa[1]), float(pa[0] @ pa[2])]
        imp_group.append(float(pa[0] @ ppl.photo(b)))
        imp_any.append(float(pa[1] @ ppl.photo(c)))
    return {"genuine": np.array(gen), "impostor_group": np.array(imp_group), "impostor_any": np.array(imp_any)}
