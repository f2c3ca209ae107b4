"""Download throughput: our download stage vs img2dataset's own `download()`, paired, same work, same clock.

    .venv/bin/python benchmarks/download.py [--images 300] [--pairs 5] [--cpus 2] [--threads 16]

Both sides are library calls from this process on one local Ray instance (`--cpus` CPUs), timed by the
same wall clock around the call (interpreter and Ray start-up out on both: Ray is started once, before
the warm-up calls), on the same URLs and shards served by a loopback server in its own process:

- A, ours: `pipeline.download.download(...)`, `run.executor: ray`: the contract's Ray executor, one task per
  manifest shard (as many in flight as the CPUs), each img2dataset's per-shard Downloader with our resizer
  and retry pass, committing its shard (parquet, stats, marker);
- B, img2dataset: `img2dataset.download(...)` over the same URLs (parquet in, parquet out) with its Ray
  distributor on the same Ray instance (one task per img2dataset shard; img2dataset shards = our manifest
  shards), the same threads, and the same hashing/EXIF settings as our stage: `compute_hash=None`,
  `extract_exif=False` (ours hashes the stored image, which img2dataset then does not).

Paper settings on both: 640 px border resize, JPEG 85, timeout 20, retries 1, opt-out headers honoured.
Every URL answers 200 with one of 64 distinct JPEGs (300-900 px crops of registry-package photos).
`paired_ratio` (benchmarks/paired.py): one warm-up of each side, then `--pairs` pairs in alternating order;
headline `ratio_vs_img2dataset` = median over pairs of (images/s ours) / (images/s img2dataset), min and
max beside it. Results: benchmarks/results/download.json.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

from benchmarks.paired import Recorder, paired_ratio  # noqa: E402

JPEG = {"Content-Type": "image/jpeg"}


def base_images(n: int = 64, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs: crops of the asset photos scaled to 300-900 px (real photos from registry packages)."""
    from PIL import Image

    from pipeline.assets import asset_path

    rng = random.Random(seed)
    photos = [Image.open(asset_path(p)).convert("RGB") for p in ("bus.jpg", "zidane.jpg", "grace_hopper.jpg")]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        scale = rng.uniform(300, 900) / max(cw, ch)
        crop = im.crop((x, y, x + cw, y + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def routes_for(n: int, kind_of=None, timeout: float = 20.0) -> dict:
    """`n` URL paths; `kind_of(i)` may make some stall past `timeout` ("stall") or answer 503 then 200 ("flaky")."""
    from tests.servers import Route

    images = base_images()
    routes: dict = {}
    for i in range(n):
        body = images[i % len(images)]
        k = kind_of(i) if kind_of else "ok"
        path = f"/img/{i:06d}.jpg"
        if k == "stall":
            routes[path] = Route(200, JPEG, body, delay=timeout + 3)
        elif k == "flaky":
            routes[path] = [Route(503, {"Content-Type": "text/plain"}, b"busy"), Route(200, JPEG, body)]
        else:
            routes[path] = Route(200, JPEG, body)
    return routes


def _serve(n: int, kind_of, timeout: float, url_q, stop_ev) -> None:
    from tests.servers import serving

    with serving(routes_for(n, kind_of, timeout)) as server:
        server.request_queue_size = 256
        url_q.put(server.base_url)
        stop_ev.wait()


class Server:
    """The loopback server in its own process (it must not share the measured process's CPU or memory)."""

    def __init__(self, n: int, kind_of=None, timeout: float = 20.0):
        ctx = multiprocessing.get_context("spawn")
        self.q, self.stop = ctx.Queue(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(n, kind_of, timeout, self.q, self.stop), daemon=True)

    def __enter__(self) -> str:
        self.proc.start()
        return self.q.get(timeout=600)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    rec = Recorder("download", args)

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.config import BuildConfig, QueryConfig
    from pipeline.download import download
    from pipeline.query import build_manifest
    from pipeline.runtime import init_ray
    from pipeline.shards import DatasetDir

    init_ray(num_cpus=args.cpus)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="webbody-bench-download-"))
    work.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, -(-args.images // (2 * args.cpus)))  # two shards per CPU on both sides
    settings = {"image_size": 640, "resize_mode": "border", "resize_only_if_bigger": False,
                "encode_quality": 85, "timeout": 20, "retries": 1}
    counter = {"ours": 0, "i2d": 0}

    with Server(args.images) as base:
        lst = work / "url.lst"
        lst.write_text("".join(f"{i} id{i % 50} {base}/img/{i:06d}.jpg\n" for i in range(args.images)))
        manifest = work / "manifest"
        build_manifest(QueryConfig(inputs=[{"path": str(lst)}], shard_size=per_shard), manifest)
        # img2dataset reads the same URLs as one parquet file and re-shards them by `per_shard`: the same
        # shards as the manifest's
        urls = work / "urls.parquet"
        parts = [str(DatasetDir(manifest).parquet(s)) for s in DatasetDir(manifest).done_ids()]
        pq.write_table(pads.dataset(parts, format="parquet").to_table(columns=["url"]), urls)
        cfg = BuildConfig.model_validate({"run": {"executor": "ray"}, "download": {
            "allow_private_hosts": ["127.0.0.1"], "thread_count": args.threads, **settings}})
        def ours() -> int:
            counter["ours"] += 1
            out = work / f"ours-{counter['ours']}"
            stats = download(cfg, manifest, out)
            shutil.rmtree(out, ignore_errors=True)
            return stats["rows_out"]

        def img2dataset_side() -> int:
            from img2dataset import download as i2d_download

            counter["i2d"] += 1
            out = work / f"i2d-{counter['i2d']}"
            i2d_download(
                url_list=str(urls), input_format="parquet", url_col="url", output_format="parquet",
                output_folder=str(out), processes_count=args.cpus, thread_count=args.threads,
                number_sample_per_shard=per_shard, image_size=640, resize_mode="border",
                resize_only_if_bigger=False, encode_quality=85, timeout=20, retries=1,
                disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
                compute_hash=None, extract_exif=False, enable_wandb=False, distributor="ray",
            )
            t = pads.dataset([str(p) for p in sorted(out.glob("*.parquet"))], format="parquet").to_table(
                columns=["status"])
            ok = sum(s == "success" for s in t.column("status").to_pylist())
            shutil.rmtree(out, ignore_errors=True)
            return ok

        p = paired_ratio(ours, img2dataset_side, pairs=args.pairs, clock="wall",
                         work_a=float, work_b=float)
    n = args.images
    rates_a = [n / s for s in p.a_seconds]
    rates_b = [n / s for s in p.b_seconds]
    rec.write(
        headlines={"ratio_vs_img2dataset": p.summary(unit="x", target=">= 0.9",
                                                     note="images/s ours / images/s img2dataset, per pair")},
        details={"images": n, "shard_size": per_shard, "ray_cpus": args.cpus, "threads": args.threads,
                 "ours_images_per_s": [round(r, 2) for r in rates_a],
                 "img2dataset_images_per_s": [round(r, 2) for r in rates_b],
                 "same_work": "same URLs and shards on the same local Ray, paper settings, compute_hash=None and "
                              "extract_exif=False on img2dataset (ours hashes the stored image)"},
    )


if __name__ == "__main__":
    main()
