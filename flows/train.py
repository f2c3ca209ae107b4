"""Prefect flows `webbody-train` and `webbody-evaluate` (thin wrappers over `sapiensid.train` / `.evaluate`)
and the `webbody train` / `webbody evaluate` subcommands.

Config: the YAML's ``train:`` section holds :class:`sapiensid.train.TrainConfig` fields; its ``evaluate:``
section lists datasets (``{name, kind, path}``; kinds: webbody_shards, market1501, ltcc, prcc,
verification_bin).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from pipeline.runtime import ensure_offline_env


def _run_training(config_path: str, overrides: dict[str, Any] | None, nproc: int, ray_workers: int,
                  ray_address: str | None, use_gpu: bool) -> dict[str, Any]:
    from sapiensid.train import TrainConfig, launch_torchrun, train, train_with_ray

    cfg = TrainConfig.from_yaml(config_path, overrides)
    if ray_workers > 0:
        from pipeline.runtime import init_ray

        init_ray(ray_address)
        return train_with_ray(cfg, ray_workers, use_gpu, ray_address)
    if nproc > 1:
        sets = [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
        code = launch_torchrun(config_path, nproc, sets)
        if code != 0:
            raise RuntimeError(f"torchrun exited with code {code}")
        summary = Path(cfg.output_dir) / "train_summary.json"
        return json.loads(summary.read_text())
    return train(cfg)


@flow(name="webbody-train", log_prints=True)
def train_flow(config_path: str, overrides: dict[str, Any] | None = None, nproc: int = 1, ray_workers: int = 0,
               ray_address: str | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """Train (or resume) SapiensID: in process, on `nproc` local ranks (torchrun), or on a Ray cluster."""
    ensure_offline_env()
    summary = _run_training(config_path, overrides, nproc, ray_workers, ray_address, use_gpu)
    print(f"trained to step {summary.get('step')}: checkpoint {summary.get('checkpoint')}")
    return summary


def datasets_from_config(config_path: str | None) -> list[dict[str, Any]]:
    if not config_path:
        return []
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    section = raw.get("evaluate", {}) if isinstance(raw, dict) else {}
    return list(section.get("datasets", []))


def pose_keypoint_fn(model: str):
    """17 body keypoints from an Ultralytics pose model for images that carry none (ReID folders): the most
    confident person, points with confidence < 0.5 set to -1; the 5 face landmarks stay -1. `model` is a weight
    path or `asset:yolo11n-pose.pt` (the registry-shipped weights)."""
    import numpy as np

    if model.startswith("asset:"):
        from pipeline.assets import asset_path

        model = str(asset_path(model[len("asset:"):]))
    from pipeline.persons import load_pose_model

    yolo = load_pose_model(model)  # the weights-only load: a crafted checkpoint runs no code

    def fn(image):
        out = np.full((22, 2), -1.0, np.float32)
        res = yolo.predict(image[:, :, ::-1], verbose=False)[0]  # ultralytics takes BGR arrays
        if res.keypoints is None or len(res.boxes) == 0:
            return out
        best = int(res.boxes.conf.argmax())
        xy = res.keypoints.xy[best].cpu().numpy()
        conf = res.keypoints.conf[best].cpu().numpy() if res.keypoints.conf is not None else np.ones(17)
        ok = conf >= 0.5
        out[:17][ok] = xy[ok]
        return out

    return fn


def _run_evaluation(checkpoint: str, datasets: list[dict[str, Any]], output: str, device: str,
                    batch_size: int, flip: bool, pose_model: str | None = None) -> dict[str, Any]:
    from sapiensid.evaluate import DatasetSpec, evaluate_checkpoint

    if not datasets:
        raise ValueError("no evaluation datasets: give --dataset NAME=KIND:PATH or an evaluate.datasets config section")
    specs = [DatasetSpec.from_dict(d) for d in datasets]
    kp_fn = pose_keypoint_fn(pose_model) if pose_model else None
    report = evaluate_checkpoint(checkpoint, specs, output, device, batch_size, flip, kp_fn)
    return {"json": str(report.json_path), "markdown": str(report.markdown_path), "results": report.results}


@flow(name="webbody-evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, datasets: list[dict[str, Any]] | None = None, config_path: str | None = None,
                  output: str = "output/evaluation", device: str = "auto", batch_size: int = 32,
                  flip: bool = True, pose_model: str | None = "asset:yolo11n-pose.pt") -> dict[str, Any]:
    """Evaluate a checkpoint on ReID folders, verification `.bin` sets and WebBody shards; JSON + markdown.
    `pose_model` gives keypoints to folder images (shards carry theirs; None: no keypoints)."""
    ensure_offline_env()
    datasets = datasets or datasets_from_config(config_path)
    needs_pose = any(d.get("kind") in ("market1501", "ltcc", "prcc") for d in datasets)
    result = _run_evaluation(checkpoint, datasets, output, device, batch_size, flip,
                             pose_model if needs_pose else None)
    markdown = Path(result["markdown"]).read_text()
    print(markdown)
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key="webbody-evaluation", description="SapiensID evaluation")
    except Exception as exc:  # artifacts need a Prefect API; the report files are the record either way
        print(f"(no Prefect artifact: {exc})")
    return result


def parse_dataset_arg(value: str) -> dict[str, str]:
    """``NAME=KIND:PATH`` -> dataset dict."""
    if "=" not in value or ":" not in value.split("=", 1)[1]:
        raise argparse.ArgumentTypeError(f"--dataset expects NAME=KIND:PATH, got {value!r}")
    name, rest = value.split("=", 1)
    kind, path = rest.split(":", 1)
    return {"name": name, "kind": kind, "path": path}


def cmd_train(args: argparse.Namespace) -> int:
    from sapiensid.train import parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.no_prefect:
        summary = _run_training(args.config, overrides, args.nproc, args.ray_workers, args.ray_address, args.gpu)
    else:
        summary = train_flow(args.config, overrides, args.nproc, args.ray_workers, args.ray_address, args.gpu)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    datasets = list(args.dataset or []) or datasets_from_config(args.config)
    if args.no_prefect:
        needs_pose = any(d.get("kind") in ("market1501", "ltcc", "prcc") for d in datasets)
        result = _run_evaluation(args.checkpoint, datasets, args.output, args.device, args.batch_size,
                                 not args.no_flip, args.pose_model if needs_pose else None)
        print(Path(result["markdown"]).read_text())
    else:
        result = evaluate_flow(args.checkpoint, datasets, None, args.output, args.device, args.batch_size,
                               not args.no_flip, args.pose_model)
    print(f"report: {result['json']}  {result['markdown']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train SapiensID on WebBody shards (webbody-train flow)")
    t.add_argument("config", help="YAML with a train: section")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train field (YAML value)")
    t.add_argument("--nproc", type=int, default=1, help="local ranks via torchrun (DDP)")
    t.add_argument("--ray-workers", type=int, default=0, help="train on Ray with this many workers (Ray Train)")
    t.add_argument("--ray-address", help="Ray cluster address for --ray-workers")
    t.add_argument("--gpu", action="store_true", help="one GPU per Ray worker")
    t.add_argument("--no-prefect", action="store_true", help="run without Prefect")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint (webbody-evaluate flow)")
    e.add_argument("--checkpoint", required=True, help="run dir, checkpoints/step_* dir or model.pt")
    e.add_argument("--dataset", action="append", type=parse_dataset_arg, metavar="NAME=KIND:PATH",
                   help="kind: webbody_shards, market1501, ltcc, prcc, verification_bin (repeatable)")
    e.add_argument("--config", help="YAML with an evaluate.datasets list")
    e.add_argument("--output", default="output/evaluation")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--no-flip", action="store_true", help="disable horizontal-flip TTA")
    e.add_argument("--pose-model", default="asset:yolo11n-pose.pt",
                   help="pose weights giving keypoints to folder datasets (path or asset:NAME)")
    e.add_argument("--no-prefect", action="store_true", help="run without Prefect")
    e.set_defaults(fn=cmd_evaluate)
