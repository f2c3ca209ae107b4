"""Faces stage throughput per CPU core: each model alone vs the whole stage, in one run.

Everything runs on one thread (onnxruntime intra-op 1, torch 1 thread, dlib single-threaded), so faces/s are
per core. Inputs: persons rows (PERSONS schema) built from the real photos of ``pipeline.assets``: a body-like
crop around every confident face of obama x3, biden, astronaut, grace_hopper, t1 and solvay (each photo first
fitted into 640 px as the download stage does), with COCO
keypoints placed from the face (so the official upper-body pre-crop runs), JPEG q95, repeated to ``--rows``.

Paired (`benchmarks/paired.py`): the stage and the models alone interleaved in alternating order, >= 5 pairs,
median of the per-pair ratios with min and max, CPU seconds of this process as the clock (per core).

* ``model``: RetinaFace-mnet0.25 on the already pre-cropped 160 canvases (batches of 16) + similarity alignment
  and 112 warp per face + the embedder on the already aligned faces (batches of 16);
* ``stage``: ``FacesStage.process`` on PERSONS tables of the same rows (JPEG decode, pre-crop, letterbox,
  detect, align, embed, float16 rows); in-process, the executors' costs are the engine's benchmarks.
Both on the default backend (``backend: auto``: the detector on OpenVINO here; KP-RPE compiled to OpenVINO).
Headlines: ``ratio_stage_vs_model`` for the demo (RetinaFace-mnet0.25 + dlib, real CC0 weights) and
``ratio_stage_vs_model_kprpe_base`` for KP-RPE ViT-B (random weights: the real model's compute).
Detail: simplejpeg vs OpenCV decoding the crops (paired, and the largest pixel difference).

Writes ``benchmarks/results/faces.json``. Sized for a few minutes on the shared 2-core machine.

Usage: python benchmarks/faces.py [--rows 48] [--kprpe-base-rows 16] [--pairs 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

import numpy as np  # noqa: E402

from benchmarks.paired import Recorder, paired_ratio  # noqa: E402

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png", "grace_hopper.jpg", "t1.jpg",
          "solvay.jpg")


def make_rows(n: int) -> list[dict]:
    """Persons rows: a body-like crop (face box x3 wide, x5 tall, face near the top) around each face."""
    import cv2

    from pipeline.assets import asset_path
    from pipeline.faces.detectors import FaceDetector
    from tests.faces_support import keypoints_from_face, load_rgb, person_row

    det = FaceDetector(asset_path("retinaface_mnet025.onnx"), num_threads=1)
    base = []
    for p in PHOTOS:
        img = load_rgb(p)
        # As the pipeline sees them: the download stage fits every photo into 640 px.
        f = 640 / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        for i, d in enumerate(det.detect_batch([img], max_faces=None, score_threshold=0.9, native=True)[0]):
            x1, y1, x2, y2 = d.box
            fw, fh = x2 - x1, y2 - y1
            cx1, cy1 = int(max(0, x1 - fw)), int(max(0, y1 - 0.5 * fh))
            cx2, cy2 = int(min(w, x2 + fw)), int(min(h, y2 + 4 * fh))
            crop = np.ascontiguousarray(img[cy1:cy2, cx1:cx2])
            off = np.array([cx1, cy1], np.float32)
            kps = keypoints_from_face(d.landmarks - off, d.box - np.tile(off, 2))
            base.append(person_row(f"{p.split('.')[0]}{i:02d}", crop, keypoints=kps))
    rows = []
    for k in range(n):
        r = dict(base[k % len(base)])
        r["sample_id"] = f"{r['sample_id']}-{k:04d}"
        r["person_id"] = f"{r['sample_id']}_0"
        rows.append(r)
    return rows


def prepared_inputs(stage, rows):
    """What the models see, computed once outside the timings: detector canvases, detections, aligned faces."""
    from collections import Counter

    from pipeline.faces.align import similarity_to_template, transform_points, warp_region
    from pipeline.faces.embedders import FaceCrop

    drops: Counter = Counter()
    prepared = [stage._prepare(r, drops) for r in rows]
    canvases = [p.canvas for p in prepared]
    dets = [d[0] for d in stage.detector.detect_batch(canvases, max_faces=1)]
    faces, landmarks = [], []
    for p, d in zip(prepared, dets):
        lm = d.landmarks * p.scale + p.shift
        m = similarity_to_template(lm)
        box = (d.box.reshape(2, 2) * p.scale + p.shift).reshape(4)
        faces.append(FaceCrop(warp_region(p.image, p.region, m), transform_points(lm, m), p.image, box))
        landmarks.append((p, lm))
    return canvases, landmarks, faces


def bench(args) -> tuple[dict, dict]:
    import torch

    from pipeline.config import FacesConfig
    from pipeline.faces import FacesStage
    from pipeline.faces.align import similarity_to_template, warp_region
    from pipeline.inference import choose_backend
    from schemas.persons import PERSONS

    torch.set_num_threads(1)
    rows = make_rows(args.rows)
    default = choose_backend("auto")
    common = dict(detector_model="retinaface_mnet025.onnx", num_threads=1, device="cpu", batch_size=16,
                  backend=default)
    configs = {
        "dlib": dict(embedder="dlib"),
        "kprpe_base": dict(embedder="kprpe", embedder_model="random", kprpe_size="base"),
    }
    heads: dict = {}
    details: dict = {"default_backend": default, "threads_per_model": 1, "embedders": {}}
    for name, extra in configs.items():
        n = args.kprpe_base_rows if name == "kprpe_base" else args.rows
        sub = rows[:n]
        stage = FacesStage(FacesConfig(**common, **extra))
        stage.ensure_setup()
        canvases, landmarks, faces = prepared_inputs(stage, sub)
        tables = [PERSONS.from_rows(sub[i:i + 16]) for i in range(0, n, 16)]

        def run_stage(stage=stage, tables=tables) -> int:
            return sum(stage.process(t).table.num_rows for t in tables)

        def run_model(canvases=canvases, landmarks=landmarks, faces=faces, stage=stage) -> int:
            for i in range(0, len(canvases), 16):  # detect, align, embed: the models' own work, same batches
                stage.detector.detect_batch(canvases[i:i + 16], max_faces=1)
            for p, lm in landmarks:
                warp_region(p.image, p.region, similarity_to_template(lm))
            for i in range(0, len(faces), 16):
                stage.embedder.embed(faces[i:i + 16])
            return len(faces)

        p = paired_ratio(run_stage, run_model, pairs=args.pairs, clock="cpu")
        key = "ratio_stage_vs_model" if name == "dlib" else f"ratio_stage_vs_model_{name}"
        heads[key] = p.summary(unit="x per core", target=">= 0.95",
                               note=f"FacesStage.process vs detect+align+embed alone, {name}, backend {default}, "
                                    "1 thread")
        details["embedders"][name] = {
            "faces": n, "rows_out": run_stage(),
            "stage_faces_per_core_s": round(n / float(np.median(p.a_seconds)), 2),
            "model_faces_per_core_s": round(n / float(np.median(p.b_seconds)), 2),
        }
        print(f"{name}: {details['embedders'][name]}, ratio {p.median:.3f} ({min(p.ratios):.3f}-{max(p.ratios):.3f})",
              flush=True)
    details["jpeg_decode"] = jpeg_decode(rows, args.pairs)
    return heads, details


def jpeg_decode(rows: list[dict], pairs: int) -> dict:
    """simplejpeg vs OpenCV decoding the body crops to RGB: paired speed and the largest pixel difference."""
    import cv2
    import simplejpeg

    from pipeline.faces.stage import decode_rgb

    crops = [r["crop"] for r in rows]
    diff = max(int(np.abs(simplejpeg.decode_jpeg(c, colorspace="RGB").astype(int) - decode_rgb(c).astype(int)).max())
               for c in crops)
    p = paired_ratio(lambda: [simplejpeg.decode_jpeg(c, colorspace="RGB") for c in crops] * 20,
                     lambda: [decode_rgb(c) for c in crops] * 20, pairs=pairs, clock="cpu")
    return {"ratio_simplejpeg_vs_cv2": round(p.median, 4), "min": round(min(p.ratios), 4),
            "max": round(max(p.ratios), 4), "pairs": len(p.ratios), "max_pixel_diff": diff,
            "opencv": cv2.__version__, "simplejpeg": simplejpeg.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--kprpe-base-rows", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    rec = Recorder("faces", args)
    heads, details = bench(args)
    rec.write(headlines=heads, details=details)


if __name__ == "__main__":
    main()
