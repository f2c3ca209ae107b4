"""Download throughput: our download stage run through the `webbody-build` flow vs the img2dataset CLI alone,
on the same manifest, served from a loopback server, in one run.

    .venv/bin/python benchmarks/download.py [--images 1000] [--repeats 2] [--processes 2] [--threads 16]

Both sides use the paper's settings (640 px border resize, JPEG 85, timeout 20, retries 1) with the same
processes, threads and img2dataset shard size. Images per second = successful images / wall seconds of
the stage (ours, from its `run.wall_seconds`, i.e. the stage inside the flow, not Prefect's start-up) or
of the CLI process (img2dataset's). Each side's download-only span (img2dataset's shard start to end
times, no process start-up) is reported too. Prints a table and writes benchmarks/results/download.json
with `ratio_vs_img2dataset` (ours / img2dataset's images per second, best of the repeats).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

PHOTOS = ("bus.jpg", "zidane.jpg", "astronaut.png", "grace_hopper.jpg")


def make_corpus(n: int, seed: int = 0) -> dict[str, bytes]:
    """`n` distinct JPEGs (random crops and scales of real photos from registry packages, 500-1400 px)."""
    from PIL import Image

    from pipeline.assets import asset_path

    rng = random.Random(seed)
    photos = [Image.open(asset_path(p)).convert("RGB") for p in PHOTOS]
    out: dict[str, bytes] = {}
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x, y, x + cw, y + ch))
        scale = rng.uniform(500, 1400) / max(cw, ch)
        crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out[f"/img/{i:06d}.jpg"] = buf.getvalue()
    return out


def run_ours(cfg_path: Path, out: Path) -> dict:
    from flows.build import build_flow

    t0 = time.perf_counter()
    build_flow(config_path=str(cfg_path), output=str(out), until="download")
    flow_s = time.perf_counter() - t0
    stats = json.loads((out / "download" / "stats.json").read_text())
    return {"images": stats["rows_out"], "rows": stats["rows_in"], "seconds": stats["run"]["wall_seconds"],
            "fetch_seconds": stats["run"]["img2dataset_seconds"], "flow_seconds": round(flow_s, 3)}


def run_cli(manifest: Path, out: Path, args: argparse.Namespace, per_shard: int) -> dict:
    import pyarrow.dataset as pads

    exe = Path(sys.executable).parent / "img2dataset"
    cmd = [
        str(exe), "--url_list", str(manifest), "--input_format", "parquet", "--url_col", "url",
        "--output_format", "parquet", "--output_folder", str(out), "--image_size", "640",
        "--resize_mode", "border", "--resize_only_if_bigger", "False", "--encode_quality", "85",
        "--timeout", "20", "--retries", "1", "--processes_count", str(args.processes),
        "--thread_count", str(args.threads), "--number_sample_per_shard", str(per_shard),
        "--enable_wandb", "False", "--disallowed_header_directives", '["noai","noimageai","noindex","noimageindex"]',
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset CLI failed: {proc.stderr[-2000:]}")
    t = pads.dataset([str(p) for p in sorted(out.glob("*.parquet"))], format="parquet").to_table(columns=["status"])
    ok = sum(s == "success" for s in t.column("status").to_pylist())
    from pipeline.download import fetch_span

    return {"images": ok, "rows": t.num_rows, "seconds": round(seconds, 3), "fetch_seconds": round(fetch_span(out), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import yaml

    from pipeline.config import QueryConfig
    from pipeline.query import build_manifest
    from tests.servers import Route, serving

    work = Path(args.workdir or tempfile.mkdtemp(prefix="webbody-bench-download-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    # the temporary Prefect server needs more than its default 20 s on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    t0 = time.perf_counter()
    corpus = make_corpus(args.images)
    corpus_s = time.perf_counter() - t0
    routes = {p: Route(200, {"Content-Type": "image/jpeg"}, b) for p, b in corpus.items()}
    per_shard = max(1, -(-args.images // (2 * args.processes)))  # what our stage picks for one job
    results: dict[str, list[dict]] = {"ours": [], "img2dataset": []}
    with serving(routes) as server:
        lst = work / "url.lst"
        lst.write_text("".join(f"{i} id{i % 50} {server.base_url}{p}\n" for i, p in enumerate(corpus)))
        # manifest shards of the img2dataset shard size: the CLI reads them as the same shards our job makes
        build_manifest(QueryConfig(inputs=[{"path": str(lst)}], shard_size=per_shard), work / "manifest")
        cfg = {
            "run": {"executor": "local"},
            "query": {"inputs": [{"path": str(lst)}], "shard_size": per_shard},
            "download": {"allow_private_hosts": ["127.0.0.1"], "processes_count": args.processes,
                         "thread_count": args.threads},
        }
        cfg_path = work / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        for r in range(args.repeats):
            # alternate the order so neither side always runs on a warmer page cache
            order = ("ours", "img2dataset") if r % 2 == 0 else ("img2dataset", "ours")
            for side in order:
                if side == "ours":
                    res = run_ours(cfg_path, work / f"ours-{r}")
                else:
                    res = run_cli(work / "manifest", work / f"cli-{r}", args, per_shard)
                res["images_per_s"] = round(res["images"] / res["seconds"], 2)
                res["fetch_images_per_s"] = round(res["images"] / res["fetch_seconds"], 2) if res["fetch_seconds"] else None
                results[side].append(res)
                print(f"  repeat {r} {side:12s} {res}", flush=True)

    best = {side: max(runs, key=lambda x: x["images_per_s"]) for side, runs in results.items()}
    ratio = best["ours"]["images_per_s"] / best["img2dataset"]["images_per_s"]
    fetch_ratio = None
    if best["ours"]["fetch_images_per_s"] and best["img2dataset"]["fetch_images_per_s"]:
        fetch_ratio = best["ours"]["fetch_images_per_s"] / best["img2dataset"]["fetch_images_per_s"]
    print(f"\n{'side':14s} {'images':>7s} {'wall s':>8s} {'img/s':>8s} {'fetch s':>8s} {'fetch img/s':>11s}")
    for side, b in best.items():
        print(f"{side:14s} {b['images']:7d} {b['seconds']:8.2f} {b['images_per_s']:8.2f} {b['fetch_seconds']:8.2f} "
              f"{b['fetch_images_per_s'] or 0:11.2f}")
    print(f"ratio_vs_img2dataset = {ratio:.3f} (target >= 0.90); download-only span ratio = {fetch_ratio or 0:.3f}")
    result = {
        "benchmark": "download",
        "images": args.images,
        "processes": args.processes,
        "threads": args.threads,
        "img2dataset_shard_size": per_shard,
        "corpus_seconds": round(corpus_s, 2),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runs": results,
        "best": best,
        "ratio_vs_img2dataset": round(ratio, 3),
        "fetch_ratio_vs_img2dataset": round(fetch_ratio, 3) if fetch_ratio else None,
        "target_ratio": 0.9,
    }
    out = REPO / "benchmarks" / "results" / "download.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
