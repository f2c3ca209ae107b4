"""Clean-stage quality on synthetic identities with a known truth: purity, retention, overlap recall.

Each name has a true person (photos at cosine 0.72-0.90 to the person's direction, i.e. pairs at about
0.5-0.8, like KP-RPE/ArcFace features of one person) plus label noise (10-40% of its photos are someone
else: one-off strangers and a recurring co-star), group photos (a stranger detected in the same photo),
low face scores, near-duplicate copies, alias names (a person under two names: must merge), and persons
planted in two validation sets (per-image and same-pair centers like a .bin set, three-image centers like
a folder set) among random validation centers. Face features are not centred: every person shares a common
component, so two different people are at cosine ~0.15 on average (with a tail), and 2% of names have a
look-alike (another name's person at cosine 0.55-0.68 before noise). The whole stage runs: faces shards on disk -> selection on disk.

- purity: share of kept images whose identity's majority person is their own person;
- retention: share of the true person's images a correct cleaner keeps (good face score, copies counted
  once, persons not planted in a validation set, at least 2 such images) that are kept;
- overlap_recall: share of planted persons with no image left.
Targets: purity >= 99%, retention >= 95%, overlap recall 100%. Writes benchmarks/results/clean_quality.json.

Usage: python benchmarks/clean_quality.py [--names 1500] [--dim 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from pipeline import registry  # noqa: E402
from pipeline.clean.state import normalise  # noqa: E402
from pipeline.clean.synthetic import FaceRows, at_cosine, people, photos, write_faces_dir  # noqa: E402
from pipeline.config import BuildConfig  # noqa: E402
from pipeline.shards import DatasetDir  # noqa: E402
from pipeline.valsets import write_centers  # noqa: E402


def spread_for(cos: np.ndarray) -> np.ndarray:
    return np.sqrt(1.0 / cos**2 - 1.0)


def faces_of(rng: np.random.Generator, n: int, dim: int, common: np.ndarray) -> np.ndarray:
    """Random people sharing the common face component (pairwise cosine ~0.15)."""
    return people(rng, n, dim) + 0.42 * common


def build_scenario(rng: np.random.Generator, n_names: int, dim: int) -> dict:
    common = people(rng, 1, dim)[0]
    persons = normalise(faces_of(rng, n_names, dim, common))  # the true person of name k is person k
    for k in rng.choice(n_names, size=max(1, n_names // 50), replace=False)[1:]:
        persons[k] = at_cosine(rng, persons[k - 1], float(rng.uniform(0.55, 0.68)))  # a look-alike
    spreads = spread_for(rng.uniform(0.72, 0.90, n_names))
    alias_of = {}  # alias name index -> person index
    aliases = rng.choice(n_names, size=max(1, n_names * 3 // 100), replace=False)
    rows = FaceRows()
    expected: set[str] = set()  # row ids (person_id) a correct cleaner keeps (copies: one per group)
    copies: dict[str, str] = {}  # copy person_id -> original person_id
    names = [f"name{k:05d}" for k in range(n_names)]
    for k in aliases:
        alias = f"alias{k:05d}"
        names.append(alias)
        alias_of[alias] = int(k)
    planted = set(rng.choice(n_names, size=max(2, n_names * 3 // 100), replace=False).tolist())
    planted -= set(int(k) for k in aliases)
    for name in names:
        who = alias_of.get(name, int(name[4:]) if name.startswith("name") else None)
        n_true = int(rng.integers(4, 41))
        noise = rng.uniform(0.1, 0.4)
        n_noise = int(round(n_true * noise / (1 - noise)))
        true_feats = photos(rng, np.repeat(persons[who][None], n_true, 0), spreads[who])
        good_ids = []
        for i, f in enumerate(true_feats):
            photo = f"{name}_p{i:03d}"
            score = float(rng.uniform(0.5, 0.95)) if rng.random() < 0.05 else float(rng.uniform(0.96, 1.0))
            pid = rows.add(name, photo, f, f"P{who}", face_score=score, norm=float(rng.uniform(15, 30)))
            if score > 0.95:
                good_ids.append(pid)
            if rng.random() < 0.10:  # group photo: a stranger in the same photo
                rows.add(name, photo, normalise(faces_of(rng, 1, dim, common))[0], "stranger",
                         detection=1)
            if score > 0.95 and rng.random() < 0.05:  # the same photo again from another URL, re-encoded
                cpid = rows.add(name, f"{name}_c{i:03d}", photos(rng, f[None], 0.03)[0], f"P{who}",
                                face_score=float(rng.uniform(0.96, 1.0)))
                copies[cpid] = pid
        costar = normalise(faces_of(rng, 1, dim, common))[0]
        n_costar = min(n_noise, int(rng.integers(0, 4)))
        for i in range(n_noise):
            if i < n_costar:
                f = photos(rng, costar[None], 0.6)[0]
                truth = f"costar_{name}"
            else:
                f = normalise(faces_of(rng, 1, dim, common))[0]
                truth = "stranger"
            rows.add(name, f"{name}_n{i:03d}", f, truth)
        if who not in planted and len(good_ids) >= 2:
            expected.update(good_ids)
    # Validation sets: planted persons among random centers. lfw is built as `webbody valsets build` does
    # for a .bin: each planted person appears in one same-pair, giving two image centers and one pair center.
    # agedb_30 as for an identity folder: the sum of 3 images per person.
    planted_list = sorted(planted)
    half = len(planted_list) // 2
    lp = planted_list[:half]
    img_a = photos(rng, persons[lp], spreads[lp])
    img_b = photos(rng, persons[lp], spreads[lp])
    lfw = np.concatenate([img_a, img_b, img_a + img_b, normalise(faces_of(rng, 2000, dim, common))])
    agedb_src = persons[planted_list[half:]]
    agedb = sum(photos(rng, agedb_src, spreads[planted_list[half:]]) for _ in range(3))
    agedb = np.concatenate([agedb, normalise(faces_of(rng, 2000, dim, common))])
    return {"rows": rows, "expected": expected, "copies": copies, "planted": {f"P{k}" for k in planted},
            "valsets": {"lfw": lfw, "agedb_30": agedb}, "names": len(names)}


def evaluate(sel: dict[str, dict], truth: dict[str, str], sc: dict) -> dict:
    kept = {pid: r["identity"] for pid, r in sel.items() if r["kept"]}
    by_ident: dict[str, Counter] = defaultdict(Counter)
    for pid, ident in kept.items():
        by_ident[ident][truth[pid]] += 1
    pure = sum(c.most_common(1)[0][1] for c in by_ident.values())
    purity = pure / max(1, len(kept))
    groups_kept = 0
    for pid in sc["expected"]:
        group = [pid] + [c for c, o in sc["copies"].items() if o == pid]
        groups_kept += any(g in kept for g in group)
    retention = groups_kept / max(1, len(sc["expected"]))
    left = {truth[pid] for pid in kept}
    recall = sum(p not in left for p in sc["planted"]) / max(1, len(sc["planted"]))
    dup_left = sum(c in kept and o in kept for c, o in sc["copies"].items())
    wrongly_removed = Counter(
        r["reason"] for pid, r in sel.items() if pid in sc["expected"] and not r["kept"]
        and not any(c in kept for c, o in sc["copies"].items() if o == pid))
    return {"purity": purity, "retention": retention, "overlap_recall": recall, "identities": len(by_ident),
            "kept_images": len(kept), "duplicates_left": dup_left, "planted": len(sc["planted"]),
            "expected_lost_by_reason": dict(wrongly_removed.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=1500)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    sc = build_scenario(rng, args.names, args.dim)
    rows: FaceRows = sc["rows"]
    truth = dict(zip(rows.cols["person_id"], rows.truth))
    with tempfile.TemporaryDirectory(prefix="clean-quality-") as tmp:
        tmp = Path(tmp)
        n = len(rows)
        bounds = np.linspace(0, n, 5).astype(int)
        inp = write_faces_dir(tmp / "faces", [rows.table(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])])
        files = []
        for name, feats in sc["valsets"].items():
            path = tmp / f"{name}.parquet"
            write_centers(path, name, "kprpe", "{}", [f"c{i}" for i in range(len(feats))], feats, [1] * len(feats))
            files.append(str(path))
        cfg = BuildConfig.model_validate({"clean": {"valsets": files}})
        t0 = time.perf_counter()
        stats = registry.run_stage("clean", cfg, {"faces": inp.root}, tmp / "clean")
        seconds = time.perf_counter() - t0
        sel = {r["person_id"]: r for _, t in DatasetDir(tmp / "clean").iter_tables() for r in t.to_pylist()}
    result = evaluate(sel, truth, sc)
    result.update({"names": sc["names"], "rows": n, "dim": args.dim, "seed": args.seed,
                   "seconds": round(seconds, 2), "funnel": stats["funnel"], "drops": stats["drops"],
                   "val_overlap": {k: {kk: v[kk] for kk in ("centers", "identities", "images")}
                                   for k, v in stats["steps"]["val_overlap"].items()},
                   "targets": {"purity": 0.99, "retention": 0.95, "overlap_recall": 1.0}})
    out = ROOT / "benchmarks" / "results" / "clean_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| names | rows | purity | retention | overlap recall | identities | duplicates left | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {sc['names']} | {n} | {result['purity']:.4f} | {result['retention']:.4f} | "
          f"{result['overlap_recall']:.3f} | {result['identities']} | {result['duplicates_left']} | {seconds:.1f} |")
    print("funnel:", " -> ".join(f"{f['step']} {f['identities']}/{f['images']}" for f in stats["funnel"]))
    print("expected images lost by reason:", result["expected_lost_by_reason"])


if __name__ == "__main__":
    main()
