"""Clean-stage scale: wall time and peak memory of the whole stage on N synthetic features over M names,
and how the one-detection-per-photo step grows when rows double.

The faces shards are generated first (10 000 rows each, 512-d float16 features, ~10 photos per name, 30%
label noise); then the stage runs in a child process whose peak RSS is measured on its own. Per-step times
come from the stage's log. A projection to the paper's 94 M images is printed from the measured rates:
loading and DBSCAN scale with rows, the merge search with identities squared.

Same-photo growth: `_one_detection_per_photo` on an in-memory state of N and 2N rows (512-d float16, ten
rows per identity, 5 % of identities holding a repeated photo), timed in pairs (benchmarks/paired.py):
the ratio t(2N) / t(N) must stay <= 2.2 (the old step scanned all N rows once per such identity: 4x).

Usage: python benchmarks/clean_scale.py [--rows 200000] [--names 20000] [--dim 512] [--photo-rows 500000]
Writes benchmarks/results/clean_scale.json (single process: the partitioned Ray clean is not built yet).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from benchmarks.paired import Recorder, headline, paired_ratio  # noqa: E402
from pipeline.clean.cluster import _one_detection_per_photo  # noqa: E402
from pipeline.clean.state import CleanState, normalise  # noqa: E402
from pipeline.clean.synthetic import write_faces_dir  # noqa: E402
from schemas.faces import FACES  # noqa: E402

SHARD = 10_000
PAPER_ROWS = 94_000_000  # images entering the pipeline in the paper; clean sees at most this many faces
PAPER_IDENTITIES = 3_800_000  # names: at most one identity each before merging


def shard_table(rng: np.random.Generator, start: int, n: int, names: int, persons: np.ndarray) -> pa.Table:
    idx = np.arange(start, start + n)
    name = idx % names
    noisy = rng.random(n) < 0.3
    dim = persons.shape[1]
    base = persons[name % len(persons)]
    feats = normalise(base + 0.75 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim))
    feats[noisy] = normalise(rng.standard_normal((int(noisy.sum()), dim)).astype(np.float32))
    raw = (feats * 20).astype("<f2")
    pid = [f"s{i:09d}_0" for i in idx]
    cols = {
        "person_id": pa.array(pid), "sample_id": pa.array([p[:-2] for p in pid]),
        "detection_index": pa.array(np.zeros(n, np.int32)),
        "label": pa.array([f"n{k:07d}" for k in name]), "name": pa.array([f"n{k:07d}" for k in name]),
        "face_box": pa.array([[10.0, 10.0, 60.0, 60.0]] * n, FACES.schema.field("face_box").type),
        "face_landmarks": pa.array([[1.0] * 10] * n, FACES.schema.field("face_landmarks").type),
        "face_score": pa.array(rng.uniform(0.94, 1.0, n).astype(np.float32)),
        "face_size_px": pa.array(np.full(n, 50.0, np.float32)),
        "feature": pa.array([r.tobytes() for r in raw], pa.binary()),
        "feature_dim": pa.array(np.full(n, dim, np.int32)),
        "feature_norm": pa.array(np.linalg.norm(raw.astype(np.float32), axis=1)),
        "embedder": pa.array(["kprpe"] * n),
    }
    return FACES.validate(pa.table(cols))


def generate(root: Path, rows: int, names: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    persons = normalise(rng.standard_normal((names, dim)).astype(np.float32))
    tables = [shard_table(rng, s, min(SHARD, rows - s), names, persons) for s in range(0, rows, SHARD)]
    write_faces_dir(root, tables)


def photo_state(rows: int, dim: int, seed: int = 0) -> CleanState:
    """Ten rows per identity; 5 % of identities hold one photo twice (two detections)."""
    rng = np.random.default_rng(seed)
    ident = np.arange(rows) // 10
    photo = np.arange(rows)
    n_ids = int(ident.max()) + 1
    rep = rng.choice(n_ids, size=max(1, n_ids // 20), replace=False)
    photo[rep * 10 + 1] = photo[rep * 10]  # the identity's second row is a second face of its first photo
    feats = np.empty((rows, dim), dtype=np.float16)
    for a in range(0, rows, 100_000):
        feats[a:a + 100_000] = normalise(rng.standard_normal((min(100_000, rows - a), dim)).astype(np.float32))
    return CleanState(feats=feats, norms=np.ones(rows, np.float32), label=ident.copy(), labels=[],
                      photo=photo, face_score=rng.uniform(0.96, 1, rows).astype(np.float32),
                      order_key=np.arange(rows), ident=ident.copy())


def same_photo_growth(rows: int, dim: int, pairs: int) -> tuple[dict, dict]:
    small, big = photo_state(rows, dim), photo_state(2 * rows, dim, seed=1)

    def run(st: CleanState):
        def go() -> int:
            st.ident[:] = st.label
            st.reason[:] = None
            return _one_detection_per_photo(st)
        return go

    dropped = (run(small)(), run(big)())
    p = paired_ratio(run(small), run(big), pairs=pairs)
    # paired_ratio's ratio is rate(a) / rate(b) with unit work: t(big) / t(small).
    growth = p.summary(unit="x", target="<= 2.2", note=f"t({2 * rows} rows) / t({rows} rows), "
                       f"{dim}-d float16, 5% of identities with a repeated photo")
    return growth, {"rows": rows, "dim": dim, "dropped_same_photo": dropped, "seconds_small": p.a_seconds,
                    "seconds_big": p.b_seconds}


def run_child(faces: Path, out: Path) -> None:
    """Run the stage in this (child) process; print its stats as JSON on the last line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from pipeline import registry
    from pipeline.config import BuildConfig

    t0 = time.perf_counter()
    stats = registry.run_stage("clean", BuildConfig(), {"faces": faces}, out)
    stats["wall_s"] = time.perf_counter() - t0
    print(json.dumps(stats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--names", type=int, default=20_000)
    ap.add_argument("--photo-rows", type=int, default=500_000)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--child", nargs=2, metavar=("FACES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(Path(args.child[0]), Path(args.child[1]))
        return
    rec = Recorder("clean_scale", args)
    growth, growth_details = same_photo_growth(args.photo_rows, args.dim, args.pairs)
    with tempfile.TemporaryDirectory(prefix="clean-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        generate(tmp / "faces", args.rows, args.names, args.dim)
        gen_s = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, __file__, "--child", str(tmp / "faces"), str(tmp / "clean")],
                              capture_output=True, text=True, check=True)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        log = proc.stderr
    feature_gib = args.rows * args.dim * 2 / 2**30
    wall = stats["wall_s"]
    # Projection: linear parts scale with rows; the merge search (identities^2) is timed apart in the log.
    per_row = wall / args.rows
    result = {
        "rows": args.rows, "names": args.names, "dim": args.dim, "generate_s": round(gen_s, 1),
        "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2), "feature_gib": round(feature_gib, 2),
        "identities": stats["identities"], "images": stats["images"], "funnel": stats["funnel"],
        "us_per_row": round(per_row * 1e6, 1),
        "projection_94m": {
            "rows": PAPER_ROWS,
            "linear_part_h": round(per_row * PAPER_ROWS / 3600, 2),
            "feature_memory_gib": round(PAPER_ROWS * args.dim * 2 / 2**30, 1),
            "peak_rss_gib_if_linear": round(peak_gib * PAPER_ROWS / args.rows, 1),
        },
        "log_tail": log.splitlines()[-12:],
    }
    rec.write({"same_photo_growth_x": growth,
               "stage_peak_gib": headline(round(peak_gib, 3), unit="GiB",
                                          note=f"whole stage, ONE process, {args.rows} rows / {args.names} names")},
              {"stage": result, "same_photo": growth_details})
    print(json.dumps(result["projection_94m"]))


if __name__ == "__main__":
    main()
