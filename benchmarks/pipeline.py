"""The whole build, end to end, per core: download (img2dataset from a loopback server) -> persons -> faces ->
clean -> bundle on a few hundred real-photo images, and what 94 M images would cost.

Two model sets, each one complete build with the local executor (no Ray start-up in the figures), the default
inference backend (``backend: auto``):
* ``demo``: the demo's real models (YOLO11n-pose, RetinaFace-mnet0.25, dlib ResNet);
* ``paper``: the paper's architectures with random weights (yolov8n-pose from Ultralytics' yaml, its best 2
  boxes per image kept whatever their score, a
  RetinaFace-R50-shaped detector (torchvision ResNet-50 + FPN + SSH heads, biubug6 outputs, exported to ONNX
  here), KP-RPE ViT-B): same compute as the real models, meaningless features (clean and bundle still run).
Images: the real photos of ``pipeline.assets`` in re-framed variants (``flows.demo.make_variant``), served from
127.0.0.1, grouped under names as a url.lst. Per stage: wall seconds and CPU seconds of this process and its
waited-for children (img2dataset's processes), so ``images_per_core_s`` = input images / CPU seconds.
One run per model set (not a ratio): the load average is recorded; on this shared 2-core machine absolute
rates move with the load, by up to 2x between runs.

Projection: 94 M images over the measured per-core rate of the bounding (slowest) stage mix, i.e. the overall
CPU seconds per image, on a named CPU cluster. Prices are ASSUMPTIONS (list prices change; no cloud is
reachable here), and so is every GPU figure: no GPU was measured on this machine.

Usage: python benchmarks/pipeline.py [--images 200] [--sets demo,paper]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()

import yaml  # noqa: E402

from benchmarks.paired import Recorder, headline  # noqa: E402

STAGES = ["query", "download", "persons", "faces", "clean", "bundle"]
TOTAL_IMAGES = 94_000_000
# A named CPU cluster for the projection; the price is an assumption (on-demand list price, may be stale).
CLUSTER = {"name": "16 x c7i.8xlarge (32 vCPU each, 512 vCPU)", "nodes": 16, "vcpus_per_node": 32,
           "usd_per_node_hour": 1.428, "price_note": "ASSUMPTION: AWS on-demand list price, us-east-1"}


def make_corpus(root: Path, n: int, per_name: int = 10) -> list[tuple[str, str]]:
    """`n` JPEG files of real people (photo variants), `per_name` per name: (name, relative path) pairs."""
    from PIL import Image

    from flows.demo import make_variant
    from pipeline.assets import PHOTOS, asset_path

    sources = [Image.open(asset_path(p)).convert("RGB") for p in PHOTOS]
    entries = []
    for i in range(n):
        photo, variant = i % len(sources), (i // len(sources)) % 3
        img = make_variant(sources[photo], variant)
        if i >= 3 * len(sources):  # beyond the 3 variants: rescale so every file is its own bytes
            f = 0.6 + 0.05 * ((i // (3 * len(sources))) % 8)
            img = img.resize((max(64, int(img.width * f)), max(64, int(img.height * f))))
        rel = f"img/{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / rel).write_bytes(buf.getvalue())
        entries.append((f"Person {i // per_name:03d}", rel))
    return entries


def retinaface_r50_onnx(path: Path) -> Path:
    """A RetinaFace-R50-shaped detector with random weights (biubug6 layout), exported to ONNX for timing.

    Written here because no RetinaFace-R50 architecture ships in an installed package: ResNet-50 body
    (torchvision), torchvision's FeaturePyramidNetwork on C3-C5 (256 channels), SSH context modules, and per
    level 2-anchor heads for boxes (4), classes (2, softmaxed) and 5 landmarks (10), as biubug6's network.
    """
    import torch
    import torchvision
    from torch import nn
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.ops import FeaturePyramidNetwork

    def conv(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.LeakyReLU(0.1)) if relu else nn.Sequential(*layers)

    class SSH(nn.Module):
        def __init__(self, c: int = 256):
            super().__init__()
            self.a = conv(c, c // 2, relu=False)
            self.b1, self.b2 = conv(c, c // 4), conv(c // 4, c // 4, relu=False)
            self.c1, self.c2 = conv(c // 4, c // 4), conv(c // 4, c // 4, relu=False)

        def forward(self, x):
            b = self.b1(x)
            return torch.relu(torch.cat([self.a(x), self.b2(b), self.c2(self.c1(b))], 1))

    class RetinaFaceR50(nn.Module):
        def __init__(self):
            super().__init__()
            body = torchvision.models.resnet50()
            self.body = create_feature_extractor(body, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
            self.fpn = FeaturePyramidNetwork([512, 1024, 2048], 256)
            self.ssh = nn.ModuleList(SSH() for _ in range(3))
            self.loc = nn.ModuleList(nn.Conv2d(256, 2 * 4, 1) for _ in range(3))
            self.cls = nn.ModuleList(nn.Conv2d(256, 2 * 2, 1) for _ in range(3))
            self.lmk = nn.ModuleList(nn.Conv2d(256, 2 * 10, 1) for _ in range(3))

        def forward(self, x):
            feats = list(self.fpn(self.body(x)).values())
            outs = [[], [], []]
            for i, f in enumerate(feats):
                f = self.ssh[i](f)
                for j, head in enumerate((self.loc, self.cls, self.lmk)):
                    o = head[i](f).permute(0, 2, 3, 1)
                    outs[j].append(o.reshape(o.shape[0], -1, (4, 2, 10)[j]))
            loc, cls, lmk = (torch.cat(o, 1) for o in outs)
            return loc, torch.softmax(cls, -1), lmk

    torch.manual_seed(0)
    model = RetinaFaceR50().eval()
    with torch.no_grad():  # zero box/landmark regressions: boxes are the priors (finite, face-sized), so the
        for head in (*model.loc, *model.lmk):  # embedder downstream gets faces to work on, as with real weights
            head.weight.zero_()
            head.bias.zero_()
    torch.onnx.export(model, (torch.zeros(1, 3, 160, 160),), str(path), input_names=["input"],
                      output_names=["loc", "conf", "landmarks"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}, "loc": {0: "b", 1: "p"},
                                    "conf": {0: "b", 1: "p"}, "landmarks": {0: "b", 1: "p"}})
    return path


def model_sets(work: Path) -> dict[str, dict]:
    return {
        "demo": {"persons": {"model": "asset:yolo11n-pose.pt"},
                 "faces": {"detector_model": "asset:retinaface_mnet025.onnx", "embedder": "dlib",
                           "embedder_model": "asset:dlib_face_recognition_resnet_model_v1.dat"}},
        # Random pose weights score no box >= 0.7: keep the best 2 whatever their score (about the persons per
        # image the demo's real model finds on these photos), so the later stages get rows to work on.
        "paper": {"persons": {"model": "yolov8n-pose.yaml", "conf_threshold": 0.0, "max_persons": 2},
                  "faces": {"detector_model": str(retinaface_r50_onnx(work / "retinaface_r50_random.onnx")),
                            "embedder": "kprpe", "embedder_model": "random", "kprpe_size": "base"}},
    }


def cpu_now() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_build(config: Path, out: Path) -> list[dict]:
    from flows.build import load_build_config, run_one_stage

    cfg = load_build_config(str(config), None)
    rows = []
    for name in STAGES:
        c0, t0 = cpu_now(), time.perf_counter()
        try:
            stats = run_one_stage(name, cfg, out)
            error = None
        except Exception as exc:  # noqa: BLE001 - a stage that fails is reported, the figures before it kept
            stats, error = {}, f"{type(exc).__name__}: {exc}"
        rows.append({"stage": name, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu_now() - c0, 2),
                     "rows_in": stats.get("rows_in"), "rows_out": stats.get("rows_out"), "error": error,
                     "loadavg_1m": round(os.getloadavg()[0], 2)})
        print(f"  {name:<9} {rows[-1]}", flush=True)
        if error:
            break
    return rows


def main() -> None:
    from flows.demo import DEMO_CONFIG, resolve_asset_refs, serve_directory, write_url_list

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--sets", default="demo,paper")
    ap.add_argument("--keep", action="store_true", help="keep the other sets of the existing pipeline.json")
    args = ap.parse_args()
    rec = Recorder("pipeline", args)
    work = Path(tempfile.mkdtemp(prefix="webbody-bench-pipeline-"))
    results: dict[str, dict] = {}
    previous = ROOT / "benchmarks" / "results" / "pipeline.json"
    if args.keep and previous.exists():
        import json

        old = json.loads(previous.read_text())
        for name, r in old["details"]["sets"].items():
            if name not in args.sets.split(","):
                results[name] = {**r, "env": old["env"]}  # measured in an earlier run: its conditions kept
    try:
        entries = make_corpus(work / "files", args.images)
        sets = model_sets(work)
        with serve_directory(work / "files") as base_url:
            url_list = write_url_list(entries, base_url, work / "url.lst")
            for name in args.sets.split(","):
                cfg = resolve_asset_refs(yaml.safe_load(DEMO_CONFIG.read_text()))
                cfg["query"]["inputs"] = [{"path": str(url_list), "format": "url_lst"}]
                cfg["query"]["shard_size"] = 50
                cfg["run"]["executor"] = "local"
                cfg["persons"].update(sets[name]["persons"], batch_size=16)
                cfg["faces"].update(sets[name]["faces"])
                path = work / f"{name}.yaml"
                path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                print(f"model set {name}:", flush=True)
                rows = run_build(path, work / f"build-{name}")
                images = next((r["rows_in"] for r in rows if r["stage"] == "download"), None) or args.images
                for r in rows:
                    r["images_per_core_s"] = round(images / r["cpu_s"], 3) if r["cpu_s"] > 0 else None
                    r["images_per_s"] = round(images / r["wall_s"], 3) if r["wall_s"] > 0 else None
                done = [r for r in rows if not r["error"]]
                cpu = sum(r["cpu_s"] for r in done)
                bound = max(done, key=lambda r: r["cpu_s"])
                faces_out = next((r["rows_out"] for r in rows if r["stage"] == "faces"), 0) or 0
                results[name] = {"images": images, "stages": rows, "faces_embedded": faces_out,
                                 "complete": len(done) == len(STAGES) and faces_out > 0,
                                 "images_per_core_s": round(images / cpu, 3), "bounding_stage": bound["stage"],
                                 "cpu_s_per_image": round(cpu / images, 4)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    projection = []
    vcpus = CLUSTER["nodes"] * CLUSTER["vcpus_per_node"]
    for name, r in results.items():
        core_hours = TOTAL_IMAGES * r["cpu_s_per_image"] / 3600
        hours = core_hours / vcpus
        projection.append({"model set": name, "cluster": CLUSTER["name"], "cpu_s_per_image": r["cpu_s_per_image"],
                           "core_hours": round(core_hours), "wall_days": round(hours / 24, 1),
                           "usd_assumed": round(hours * CLUSTER["nodes"] * CLUSTER["usd_per_node_hour"]),
                           "bounding_stage": r["bounding_stage"], "complete": r["complete"]})
    heads = {}
    for name, r in results.items():
        heads[f"images_per_core_s_{name}"] = headline(
            r["images_per_core_s"], unit="images per core-second",
            note=f"whole build, {r['images']} images, bounded by {r['bounding_stage']}; one run")
    if "paper" in results:
        heads["images_per_core_s"] = dict(heads["images_per_core_s_paper"])
    rec.write(headlines=heads, details={
        "sets": results, "projection": projection, "cluster": CLUSTER, "total_images": TOTAL_IMAGES,
        "per_stage": [{"model set": n, **{k: v for k, v in s.items() if k != "error"}}
                      for n, r in results.items() for s in r["stages"]],
        "gpu": "not measured: no GPU on this machine; any GPU figure in the docs is an assumption",
    })


if __name__ == "__main__":
    main()
