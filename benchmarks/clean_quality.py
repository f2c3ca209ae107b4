"""Clean-stage quality on hard synthetic names with a known truth (pipeline/clean/scenario.py), calibrated
against real dlib faces; the whole stage runs (faces shards on disk -> selection on disk).

Figures, each per seed (>= 5 seeds), mean and worst:
- purity: share of kept images whose identity's majority person is their own person;
- retention: share of the rows a correct cleaner keeps (the true person's good-score photos, one per copy
  group, bursts included, persons not planted in a validation set, >= 2 such photos) that are kept;
- overlap_recall: share of planted validation persons with no image left;
- overlap_false_removal: share of persons with a look-alike validation center (cosine 0.6-0.75, not planted)
  whose images were removed as validation overlap.
Headlines are the WORST over seeds at the hard setting. Also: a threshold sweep (purity vs retention, a plot
in docs/clean_sweep.svg), the noise level at which worst-seed purity falls below 0.99, and how far the
synthetic pair distributions are from real dlib faces (asset photos: Solvay 1927's faces and the other
people as impostors, Obama x3 with augmentations as genuine pairs), on scale-free measures.

Usage: python benchmarks/clean_quality.py [--names 400] [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from benchmarks.paired import Recorder, headline  # noqa: E402
from pipeline import clean as clean_stage  # noqa: E402
from pipeline.clean.overlap import member_ratio  # noqa: E402
from pipeline.clean.scenario import Scenario, Setting, build, pair_cosines  # noqa: E402
from pipeline.clean.state import normalise  # noqa: E402
from pipeline.clean.synthetic import write_faces_dir  # noqa: E402
from pipeline.config import BuildConfig  # noqa: E402
from pipeline.executors import make_executor  # noqa: E402
from pipeline.shards import DatasetDir  # noqa: E402
from pipeline.valsets import write_centers  # noqa: E402

# Where rules and constants are chosen (the overlap rule on all 40; the stage re-run on the first 5 so the JSON
# shows them beside the reported figures); reported figures use other seeds.
DEV_SEEDS = list(range(100, 140))
TARGETS = {"purity": ">= 0.99", "retention": ">= 0.9", "overlap_recall": ">= 1.0", "overlap_false_removal": "<= 0.01"}


def evaluate(sel: dict[str, dict], truth: dict[str, str], sc: Scenario) -> dict:
    kept = {pid: r["identity"] for pid, r in sel.items() if r["kept"]}
    by_ident: dict[str, Counter] = defaultdict(Counter)
    for pid, ident in kept.items():
        by_ident[ident][truth[pid]] += 1
    purity = sum(c.most_common(1)[0][1] for c in by_ident.values()) / max(1, len(kept))
    copies_of: dict[str, list[str]] = defaultdict(list)
    for c, o in sc.copies.items():
        copies_of[o].append(c)
    group_kept = {pid: pid in kept or any(c in kept for c in copies_of[pid]) for pid in sc.expected}
    retention = sum(group_kept.values()) / max(1, len(sc.expected))
    left = {truth[pid] for pid in kept}
    recall = sum(p not in left for p in sc.planted) / max(1, len(sc.planted))
    removed_as_overlap = {truth[pid] for pid, r in sel.items() if (r["reason"] or "").startswith("val_overlap")}
    false_removal = len(sc.lookalike & removed_as_overlap - left) / max(1, len(sc.lookalike))
    lost = Counter(sel[pid]["reason"] for pid, ok in group_kept.items() if not ok)
    return {"purity": purity, "retention": retention, "overlap_recall": recall,
            "overlap_false_removal": false_removal, "planted": len(sc.planted),
            "planted_missed": sum(p in left for p in sc.planted), "lookalikes": len(sc.lookalike),
            "lookalikes_removed": len(sc.lookalike & removed_as_overlap - left), "identities": len(by_ident), "kept_images": len(kept),
            "expected_lost_by_reason": dict(lost.most_common())}


def overlap_cases(sel: dict[str, dict], sc: Scenario) -> dict:
    """The validation-overlap decision read case by case: for every person with a validation center (planted
    or look-alike), the identity the cleaner made of it (its rows that reached step 5: kept, or dropped as
    overlap) against that center: center cosine and member ratio (pipeline/clean/overlap.py). Lists the
    missed planted and falsely removed look-alike persons, and the range of each group."""
    rows = sc.rows
    feats = np.frombuffer(b"".join(rows.cols["feature"]), dtype="<f2").reshape(len(rows), -1).astype(np.float32)
    unit = normalise(feats)
    at_step5: dict[str, list[int]] = defaultdict(list)
    for k, (pid, who) in enumerate(zip(rows.cols["person_id"], rows.truth)):
        reason = sel[pid]["reason"]
        if reason is None or reason.startswith("val_overlap"):
            at_step5[who].append(k)
    cases = []
    for set_name, owners in sc.val_owner.items():
        centers = normalise(sc.valsets[set_name])
        one = sc.val_images[set_name] <= 1
        for c, who in enumerate(owners):
            if who is None or len(at_step5[who]) == 0:
                continue
            r = at_step5[who]
            center = normalise(feats[r].sum(axis=0, keepdims=True))[0]
            ratio = float(member_ratio(unit[r], centers[c:c + 1])[0]) if len(r) >= 2 else None
            removed = any((sel[rows.cols["person_id"][k]]["reason"] or "").startswith("val_overlap") for k in r)
            cases.append({"person": who, "set": set_name, "one_image": one, "planted": who in sc.planted,
                          "images": len(r), "center_cos": round(float(center @ centers[c]), 4),
                          "member_ratio": None if ratio is None else round(ratio, 4), "removed": removed})
    out: dict = {"missed_planted": [c for c in cases if c["planted"] and not c["removed"]],
                 "removed_lookalikes": [c for c in cases if not c["planted"] and c["removed"]]}
    for one in (True, False):
        for planted in (True, False):
            grp = [c for c in cases if c["one_image"] == one and c["planted"] == planted]
            key = f"{'one_image' if one else 'folder'}_{'planted' if planted else 'lookalike'}"
            ratios = [c["member_ratio"] for c in grp if c["member_ratio"] is not None]
            out[key] = {"n": len(grp), "center_cos": [min((c["center_cos"] for c in grp), default=None),
                                                      max((c["center_cos"] for c in grp), default=None)],
                        "member_ratio": [min(ratios, default=None), max(ratios, default=None)]}
    return out


def run_once(seed: int, setting: Setting, clean: dict, tmp: Path) -> dict:
    sc = build(seed, setting)
    rows = sc.rows
    truth = dict(zip(rows.cols["person_id"], rows.truth))
    work = Path(tempfile.mkdtemp(dir=tmp))
    n = len(rows)
    bounds = np.linspace(0, n, 5).astype(int)
    inp = write_faces_dir(work / "faces", [rows.table(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])])
    files = []
    for name, feats in sc.valsets.items():
        path = work / f"{name}.parquet"
        write_centers(path, name, "kprpe", "{}", [f"c{i}" for i in range(len(feats))], feats,
                      [sc.val_images[name]] * len(feats))
        files.append(str(path))
    cfg = BuildConfig.model_validate({"clean": {"valsets": files, **clean}})
    t0 = time.perf_counter()
    # Synthetic features have no photos, so no persons input: the copy step is skipped (it says so).
    stats = clean_stage.run(cfg, {"faces": inp.root}, work / "clean", executor=make_executor("local"))
    seconds = time.perf_counter() - t0
    sel = {r["person_id"]: r for _, t in DatasetDir(work / "clean").iter_tables() for r in t.to_pylist()}
    out = evaluate(sel, truth, sc)
    out["overlap_cases"] = overlap_cases(sel, sc)
    out.update({"seed": seed, "rows": n, "names": sc.names, "seconds": round(seconds, 2), "drops": stats["drops"]})
    return out


def over_seeds(seeds: list[int], setting: Setting, clean: dict, tmp: Path) -> dict:
    runs = [run_once(s, setting, clean, tmp) for s in seeds]
    out: dict = {"runs": runs}
    for k, target in TARGETS.items():
        vals = [r[k] for r in runs]
        worst = max(vals) if target.startswith("<") else min(vals)
        out[k] = {"mean": float(np.mean(vals)), "worst": float(worst), "min": float(min(vals)),
                  "max": float(max(vals))}
    return out


# ---- bounds on the one-image overlap decision -----------------------------------------------------------

def _one_image_cases(seed: int, setting: Setting) -> dict:
    """A seed's one-image validation centers of planted and look-alike persons, scored with what no cleaner
    sees: cos(image, the person's direction), and cos(image, the noise-free center of the person's photos)
    with its number of pose/age modes."""
    sc = build(seed, setting)
    out: dict = {"planted": len(sc.planted), "lookalikes": len(sc.lookalike), "cases": []}
    for set_name, owners in sc.val_owner.items():
        if sc.val_images[set_name] > 1:
            continue
        centers = normalise(sc.valsets[set_name])
        for c, who in enumerate(owners):
            if who is not None:
                lat = sc.latent[who]
                out["cases"].append((who in sc.planted, float(centers[c] @ lat["dir"]),
                                     float(centers[c] @ lat["center"]), lat["modes"]))
    return out


def _cut(pos: np.ndarray, neg: np.ndarray, recall_first: bool) -> float:
    """A threshold (remove above it): just below the lowest positive, or the fewest errors."""
    if recall_first:
        return float(pos.min()) - 1e-6
    cand = np.unique(np.concatenate([pos, neg]))
    return float(min(cand, key=lambda t: (pos <= t).sum() + (neg > t).sum()))


def overlap_bounds(dev: list[int], seeds: list[int], setting: Setting) -> dict:
    """How well a rule could decide one-image validation centers given information no cleaner has, with the
    thresholds chosen on the dev seeds and counted on the reported seeds (folder centers counted as decided
    right, as the stage decides them):
    - `true_direction`: cos(image, the person's direction);
    - `noise_free_center`: cos(image, the noise-free center of the person's photos), one threshold per number
      of pose/age modes (both known). A rule on the identity's photos sees at most this, and less: the
      photos are a finite, noisy sample of that center.
    Each at two operating points: `recall_first` (just below the lowest planted dev score) and `fewest_errors`
    (fewest dev errors). Per point, the worst reported seed's overlap_recall and overlap_false_removal."""
    dev_cases = [_one_image_cases(s, setting) for s in dev]
    rep = [_one_image_cases(s, setting) for s in seeds]

    def scores(cases: list, kind: str, modes: int | None) -> tuple[np.ndarray, np.ndarray]:
        col = 1 if kind == "true_direction" else 2
        sel = [c for c in cases if modes is None or c[3] == modes]
        v = np.array([c[col] for c in sel])
        lab = np.array([c[0] for c in sel], dtype=bool)
        return v[lab], v[~lab]

    out: dict = {"dev_seeds": f"{dev[0]}-{dev[-1]}", "seeds": seeds, "points": []}
    for kind, groups in (("true_direction", [None]), ("noise_free_center", [1, 2, 3])):
        for point in ("recall_first", "fewest_errors"):
            cuts = {m: _cut(*scores([c for d in dev_cases for c in d["cases"]], kind, m), point == "recall_first")
                    for m in groups}
            per_seed = []
            for r in rep:
                missed = removed = 0
                for m in groups:
                    pos, neg = scores(r["cases"], kind, m)
                    missed += int((pos <= cuts[m]).sum())
                    removed += int((neg > cuts[m]).sum())
                per_seed.append((1 - missed / r["planted"], removed / r["lookalikes"], missed, removed))
            out["points"].append({
                "bound": kind, "point": point,
                "threshold": [round(t, 4) for t in cuts.values()],  # noise-free center: one per 1, 2, 3 modes
                "overlap_recall": min(p[0] for p in per_seed), "overlap_false_removal": max(p[1] for p in per_seed),
                "missed_per_seed": [p[2] for p in per_seed], "removed_per_seed": [p[3] for p in per_seed]})
    return out


# ---- calibration against real dlib faces -------------------------------------------------------------

def real_dlib_cosines() -> dict[str, np.ndarray] | None:
    """Cosines of real dlib features: impostors = distinct people (Solvay's faces, t1's, the single-person
    photos but Obama); genuine = Obama x3 and augmented copies (mirror, darker, cropped, blurred, rotated)."""
    try:
        import cv2

        from pipeline.assets import asset_path
        from pipeline.faces.detectors import FaceDetector
        from pipeline.faces.embedders import DlibEmbedder, FaceCrop
    except ImportError:
        return None
    try:
        det = FaceDetector(asset_path("retinaface_mnet025.onnx"))
        emb = DlibEmbedder(asset_path("dlib_face_recognition_resnet_model_v1.dat"),
                           asset_path("shape_predictor_5_face_landmarks.dat"))
    except Exception as exc:  # noqa: BLE001 - no model files here: the calibration is skipped and says so
        print("calibration skipped:", exc)
        return None

    def rgb(name: str) -> np.ndarray:
        return np.ascontiguousarray(cv2.imread(str(asset_path(name)), cv2.IMREAD_COLOR)[:, :, ::-1])

    def faces_of(img: np.ndarray, most: int | None) -> list:
        return det.detect_batch([img], max_faces=most, score_threshold=0.9, native=True)[0]

    def embed(img: np.ndarray, dets: list) -> np.ndarray:
        f = emb.embed([FaceCrop(np.zeros((112, 112, 3), np.uint8), d.landmarks, img, d.box) for d in dets])
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def augment(img: np.ndarray) -> list[np.ndarray]:
        h, w = img.shape[:2]
        rot = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 12, 1.0), (w, h), borderValue=(255,) * 3)
        return [img, img[:, ::-1].copy(), (img * 0.6).astype(np.uint8),
                img[int(h * 0.08):, int(w * 0.06):w - int(w * 0.04)].copy(), cv2.GaussianBlur(img, (0, 0), 2.0), rot]

    gen = []
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg"):
        for img in augment(rgb(name)):
            dets = faces_of(img, 1)
            if dets:
                gen.append((name, embed(img, dets)[0]))
    imp = []
    for name in ("solvay.jpg", "t1.jpg", "biden.jpg", "zidane.jpg", "grace_hopper.jpg", "astronaut.png", "bus.jpg"):
        img = rgb(name)
        dets = faces_of(img, None)
        imp += list(embed(img, dets)) if dets else []
    imp_f = np.stack(imp)
    gf = np.stack([f for _, f in gen])
    src = np.array([n for n, _ in gen])
    g = gf @ gf.T
    iu = np.triu_indices(len(gf), 1)
    # Genuine pairs across different source photos (a photo vs its own augmentation is a copy, not a pair).
    cross = src[iu[0]] != src[iu[1]]
    i2 = np.triu_indices(len(imp_f), 1)
    return {"genuine": g[iu][cross], "genuine_augmented": g[iu][~cross], "impostor": (imp_f @ imp_f.T)[i2],
            "faces": np.array([len(gf), len(imp_f)])}


def separation(gen: np.ndarray, imp: np.ndarray) -> dict:
    """Scale-free measures (embedders differ in scale): d', and each side's share beyond the other's 5 %."""
    d = (gen.mean() - imp.mean()) / np.sqrt((gen.var() + imp.var()) / 2)
    return {"d_prime": float(d), "impostor_above_genuine_p5": float((imp > np.percentile(gen, 5)).mean()),
            "genuine_below_impostor_p95": float((gen < np.percentile(imp, 95)).mean()),
            "genuine_pct": np.percentile(gen, [5, 50, 95]).round(3).tolist(),
            "impostor_pct": np.percentile(imp, [5, 50, 95]).round(3).tolist()}


def calibration(setting: Setting) -> dict:
    syn = pair_cosines(0, setting)
    out = {"synthetic": separation(syn["genuine"], syn["impostor_group"]),
           "synthetic_any_group": separation(syn["genuine"], syn["impostor_any"])}
    real = real_dlib_cosines()
    if real is None:
        out["real_dlib"] = None
        return out
    out["real_dlib"] = separation(real["genuine"], real["impostor"])
    out["real_dlib"]["faces"] = {"genuine": int(real["faces"][0]), "impostor": int(real["faces"][1])}
    out["real_dlib_augmented_copies"] = np.percentile(real["genuine_augmented"], [5, 50, 95]).round(3).tolist()
    out["d_prime_gap"] = out["synthetic"]["d_prime"] - out["real_dlib"]["d_prime"]
    return out


# ---- plot ----------------------------------------------------------------------------------------------

def sweep_svg(points: list[dict], bounds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for family in sorted({p["family"] for p in points}):
        pts = [p for p in points if p["family"] == family]
        panels = [(ax, "retention", "purity")]
        if family == "val_overlap_image":  # the overlap trade-off: the one-image cut decides the errors
            panels.append((bx, "overlap_false_removal", "overlap_recall"))
        for a, x, y in panels:
            a.plot([p[x] for p in pts], [p[y] for p in pts], "o-", label=family)
            for p in pts:
                a.annotate(f"{p['value']}", (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for v in bounds["points"]:
        bx.plot([v["overlap_false_removal"]], [v["overlap_recall"]], "kx" if v["bound"] == "true_direction" else "k+")
        bx.annotate(f"{v['bound']}, {v['point']}".replace("_", " "), (v["overlap_false_removal"], v["overlap_recall"]),
                    fontsize=6, xytext=(3, -8), textcoords="offset points")
    for a, (tx, ty), (xl, yl), title in (
            (ax, (0.90, 0.99), ("retention", "purity"), "clean: threshold sweep, hard setting"),
            (bx, (0.01, 1.0), ("overlap false removal", "overlap recall"),
             "validation overlap; x/+: bounds with hidden truth")):
        a.axhline(ty, color="grey", lw=0.8, ls="--")  # the targets
        a.axvline(tx, color="grey", lw=0.8, ls="--")
        a.set_xlabel(f"{xl} (worst seed)")
        a.set_ylabel(f"{yl} (worst seed)")
        a.set_title(title)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed (the rules were chosen on the development seeds 100-139: report on others)")
    ap.add_argument("--quick", action="store_true", help="hard setting only (no sweep, noise scan, calibration)")
    args = ap.parse_args()
    rec = Recorder("clean_quality", args)
    setting = Setting(names=args.names)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # The cleaner's settings for this benchmark: official thresholds but DBSCAN eps 0.55 (link at cosine
    # >= 0.45): at the official 0.7 (cosine 0.3) DBSCAN chains the same-group impostors (0.2-0.35) together.
    tuned = {"dbscan_eps": 0.55}
    clean: dict = {"thresholds": {"kprpe": tuned}}
    with tempfile.TemporaryDirectory(prefix="clean-quality-") as tmp:
        tmp = Path(tmp)
        hard = over_seeds(seeds, setting, clean, tmp)
        print("hard:", {k: hard[k] for k in TARGETS})
        details: dict = {"setting": vars(setting), "clean_config": clean, "hard": hard}
        if not args.quick:
            # The development seeds the overlap rule's constants were chosen on (pipeline/clean/overlap.py),
            # run again so the JSON shows them beside the reported seeds; never the headline.
            dev = [s for s in DEV_SEEDS[:5] if s not in seeds]
            if dev:
                d = over_seeds(dev, setting, clean, tmp)
                details["development_seeds"] = {
                    "seeds": dev, "note": "the validation-overlap rule and its constants (pipeline/clean/overlap.py) "
                    f"were chosen on seeds {DEV_SEEDS[0]}-{DEV_SEEDS[-1]}, these among them; the headlines are "
                    "the other seeds", **{k: d[k] for k in TARGETS}}
                print("development seeds:", details["development_seeds"])
            sweep_seeds = seeds[:2]
            official = over_seeds(sweep_seeds, setting, {}, tmp)
            details["official_thresholds"] = {k: official[k] for k in TARGETS}
            print("official:", details["official_thresholds"])
            points = []
            for family, values in (("dbscan_eps", (0.5, 0.55, 0.6, 0.7)), ("val_overlap", (0.65, 0.7, 0.75)),
                                   ("val_overlap_image", (0.7, 0.73, 0.76, 0.79))):
                for v in values:
                    thr = {"thresholds": {"kprpe": {**tuned, family: v}}}
                    r = over_seeds(sweep_seeds, setting, thr, tmp)
                    points.append({"family": family, "value": v, **{k: r[k]["worst"] for k in TARGETS}})
                    print("sweep", points[-1])
            details["sweep"] = points
            bounds = overlap_bounds([s for s in DEV_SEEDS if s not in seeds], seeds, setting)
            details["overlap_bounds"] = bounds
            print("overlap bounds", bounds["points"])
            sweep_svg(points, bounds, ROOT / "docs" / "clean_sweep.svg")
            scan = []
            for lo, hi in ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9)):
                r = over_seeds(sweep_seeds, replace(setting, noise=(lo, hi)), clean, tmp)
                scan.append({"noise": f"{lo:.2f}-{hi:.2f}", "purity": r["purity"]["worst"],
                             "retention": r["retention"]["worst"]})
                print("noise", scan[-1])
            details["noise_scan"] = scan
            breaks = next((s["noise"] for s in scan if s["purity"] < 0.99), None)
            details["purity_below_0.99_at_noise"] = breaks
            details["calibration"] = calibration(setting)
            print("calibration", details["calibration"])
    if args.quick:
        # The sweep, noise scan and calibration were not re-run: carry them from the last full run, marked.
        last = ROOT / "benchmarks" / "results" / "clean_quality.json"
        if last.exists():
            import json

            prev = json.loads(last.read_text())
            carried = [k for k in ("official_thresholds", "sweep", "noise_scan", "purity_below_0.99_at_noise",
                                   "calibration") if k in prev.get("details", {})]
            details.update({k: prev["details"][k] for k in carried})
            details["carried_from_earlier_run"] = {
                "keys": carried, "measured": prev.get("env", {}).get("started"),
                "note": "not re-run with --quick; measured with the rules of that run (one validation threshold)"}
    heads = {k: headline(hard[k]["worst"], hard[k]["min"], hard[k]["max"], unit="share", target=t,
                         note=f"worst of {len(seeds)} seeds, hard setting; mean {hard[k]['mean']:.4f}")
             for k, t in TARGETS.items()}
    rec.write(heads, details)


if __name__ == "__main__":
    main()
