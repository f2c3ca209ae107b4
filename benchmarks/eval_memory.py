"""Evaluation memory does not grow with the test set: peak RSS of WebBody-test evaluation over 2k vs 20k samples.

    .venv/bin/python benchmarks/eval_memory.py [--small 2000 --large 20000 --identities 100 --size 96]
                                               [--input-size 96 --batch-size 8]

Writes two generated test sets (tiny `--size` px images, `--identities` identities, so the query count and the
similarity blocks are the same size in both), then runs `sapiensid.evaluate.evaluate_webbody_shards` with the
tiny preset in a fresh child process per set (small first, then large, then small and large again), sampling the
child's RSS every 20 ms. `--input-size` overrides the tiny preset's model input (96 px): the tiny model's
cost is its keypoint relative-position tables, quadratic in the token count (0.3-0.5 s a sample at 96 px on the
shared 2-core machine, so 20k samples would take hours), while what this measures, the streaming evaluation
path, is the same code at any input size; the JSON records the size used. Target (issue #12): peak(20k) - peak(2k) <= 300 MB. Keeping the decoded test images,
as evaluation did before, would grow by ~18k x size^2 x 3 bytes plus their prepared copies.
Writes benchmarks/results/eval_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()


def write_set(out: Path, n: int, identities: int, size: int, per_shard: int = 1000) -> list[str]:
    """`n` schema-valid test samples; images come from a pool of 4 renders per identity, keys are unique."""
    import cv2
    import numpy as np
    import webdataset as wds

    from sapiensid.data.synthetic import IMAGE_SIZE, Identity, render, sample_record

    scale = size / IMAGE_SIZE
    pool = {}
    for i in range(identities):
        for k in range(4):
            img, fields = render(Identity.make(i), np.random.default_rng((i, k)))
            small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
            f = json.loads(json.dumps(fields))
            f["keypoints"] = [[x * scale, y * scale, v] for x, y, v in f["keypoints"]]
            for box in ("content_box", "body_box", "face_box"):
                if f.get(box) is not None:
                    f[box] = [v * scale for v in f[box]]
            if f.get("face_landmarks") is not None:
                f["face_landmarks"] = [[x * scale, y * scale] for x, y in f["face_landmarks"]]
            pool[i, k] = (small, f)
    out.mkdir(parents=True, exist_ok=True)
    paths, writer = [], None
    for j in range(n):
        if j % per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(str(out / f"webbody-test-{len(paths):06d}.tar"))
            writer = wds.TarWriter(paths[-1])
        label = j % identities
        img, fields = pool[label, (j // identities) % 4]
        key = f"t_{label:05d}_{j:06d}"
        jpg, meta = sample_record(key, label, "test", img, fields)
        writer.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})
    if writer is not None:
        writer.close()
    return paths


CHILD = """
import json, sys, time, torch
from pipeline.runtime import ensure_offline_env
ensure_offline_env()
torch.set_num_threads(1)
from sapiensid.config import SapiensIDConfig
from sapiensid.evaluate import evaluate_webbody_shards
from sapiensid.model import SapiensID
torch.manual_seed(0)
model = SapiensID(SapiensIDConfig.preset("tiny", input_size=int(sys.argv[2]))).eval()
urls = json.loads(sys.argv[1])
t0 = time.perf_counter()
res = evaluate_webbody_shards(model, urls, torch.device("cpu"), batch_size=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - t0, "queries": res["num_query_images"],
                  "gallery": res["num_gallery_images"], "top1": res["general"]["top1"]}))
"""


def measure(urls: list[str], input_size: int = 96, batch_size: int = 8) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(urls), str(input_size), str(batch_size)],
                            stdout=subprocess.PIPE,
                            cwd=str(REPO), env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else b""
    if proc.returncode != 0:
        raise RuntimeError(f"evaluation child failed with code {proc.returncode}")
    return {"peak_rss_mb": round(peak / 2**20, 1), **json.loads(out.decode().strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=96, help="the tiny model's input size (a multiple of 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from benchmarks.paired import Recorder, headline

    rec = Recorder("eval_memory", args, packages=("torch", "numpy", "webdataset", "psutil"))
    runs: dict[str, list[dict]] = {"small": [], "large": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        sets = {"small": write_set(Path(tmp) / "small", args.small, args.identities, args.size),
                "large": write_set(Path(tmp) / "large", args.large, args.identities, args.size)}
        for r in range(args.rounds):  # alternate the order, like a paired measurement
            for name in (("small", "large") if r % 2 == 0 else ("large", "small")):
                runs[name].append(measure(sets[name], args.input_size, args.batch_size))
                print(name, runs[name][-1], flush=True)
    small_peak = max(x["peak_rss_mb"] for x in runs["small"])
    large_peak = max(x["peak_rss_mb"] for x in runs["large"])
    growth = [b["peak_rss_mb"] - a["peak_rss_mb"] for a, b in zip(runs["small"], runs["large"])]
    rec.write(
        headlines={
            "rss_growth_mb_20k_vs_2k" if (args.small, args.large) == (2000, 20000)
            else "rss_growth_mb_large_vs_small": headline(
                round(large_peak - small_peak, 1), lo=min(growth), hi=max(growth), pairs=len(growth), unit="MB",
                target="<= 300",
                note=f"peak RSS over {args.large} minus over {args.small} test samples (tiny preset, model input "
                     f"{args.input_size} px, {args.size} px images, batch {args.batch_size}); highest peak of each "
                     "side, per-round differences as min/max"),
            "peak_rss_mb_large": headline(large_peak, unit="MB"),
        },
        details={"runs": runs},
    )


if __name__ == "__main__":
    main()
