"""Prefect flow `webbody-finetune` and the `webbody finetune CONFIG` subcommand (thin over `sapiensid.finetune`).

Steps: (1) keypoints: images of the train / evaluation sets that have none get the persons stage's pose
keypoints (its Ultralytics pose model), written to ``ROOT/keypoints.json`` so a re-run reuses them; (2) evaluate
the base model; (3) fine-tune (resumes from the newest checkpoint in ``output_dir``); (4) evaluate the
fine-tuned model on the cross-domain protocols. Reports: ``<output_dir>/eval/{base,finetuned}/finetune_eval.*``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task

from pipeline.runtime import ensure_offline_env


def _missing_keypoint_images(cfg: Any) -> dict[Path, list[Path]]:
    """root -> image paths without keypoints, for every dataset the config reads."""
    from sapiensid.finetune import load_datasets

    train, test = load_datasets(cfg)
    # LLCM: one root for both splits; folder layout: train_root and eval_root
    roots = [Path(cfg.train_root), Path(cfg.eval_root or cfg.train_root) if cfg.data == "folder" else Path(cfg.train_root)]
    out: dict[Path, list[Path]] = {}
    for root, ds in zip(roots, [train, test]):
        if ds is None:
            continue
        out.setdefault(root, []).extend(im.path for im in ds.images if im.keypoints is None)
    return out


@task(name="finetune-keypoints")
def compute_keypoints(config_path: str, overrides: dict[str, Any] | None) -> dict[str, int]:
    """Pose keypoints for the images that lack them (None pose_model: nothing is computed)."""
    from sapiensid.finetune import FinetuneConfig
    from sapiensid.finetune.data import read_image, write_keypoints

    cfg = FinetuneConfig.from_yaml(config_path, overrides)
    missing = _missing_keypoint_images(cfg)
    counts = {str(root): len(paths) for root, paths in missing.items()}
    if not cfg.pose_model or not any(missing.values()):
        return counts
    from flows.train import pose_keypoint_fn

    fn = pose_keypoint_fn(cfg.pose_model)
    for root, paths in missing.items():
        if paths:
            write_keypoints(root, {p.relative_to(root).as_posix(): fn(read_image(p)) for p in sorted(set(paths))})
    return counts


def run_finetune(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate (no keypoint step); used by the flow and by ``--no-prefect``."""
    from sapiensid.finetune import FinetuneConfig, finetune, load_datasets
    from sapiensid.finetune.adapt import load_base
    from sapiensid.finetune.evaluate import evaluate_cross_domain, write_report
    from sapiensid.finetune.trainer import resolve_device

    cfg = FinetuneConfig.from_yaml(config_path, overrides)
    train, test = load_datasets(cfg)
    out = Path(cfg.output_dir)
    reports: dict[str, Any] = {}

    def _eval(name: str, model: Any) -> None:
        assert test is not None
        res = evaluate_cross_domain(model, test, cfg.protocols, cfg.features, resolve_device(cfg.device),
                                    cfg.eval_batch_size)
        jp, mp = write_report(res, out / "eval" / name, {"model": name, "config": config_path})
        reports[name] = {"json": str(jp), "markdown": str(mp), "results": res}

    if test is not None and cfg.evaluate_base:
        _eval("base", load_base(cfg.base_checkpoint, cfg.base_model, cfg.model_overrides))
    summary = finetune(cfg, datasets=(train, test))
    model = summary.pop("model")
    if test is not None and summary["final"]:
        _eval("finetuned", model)
    return {"summary": summary, "reports": reports}


@flow(name="webbody-finetune", log_prints=True)
def finetune_flow(config_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune SapiensID on a labelled multi-domain set (folder layout or LLCM) and evaluate cross-domain."""
    ensure_offline_env()
    counts = compute_keypoints(config_path, overrides)
    print(f"images without keypoints: {counts}")
    result = run_finetune(config_path, overrides)
    for name, rep in result["reports"].items():
        print(f"## {name}\n" + Path(rep["markdown"]).read_text())
    return result


def cmd_finetune(args: argparse.Namespace) -> int:
    from sapiensid.train import parse_overrides

    overrides = parse_overrides(args.set or [])
    if args.no_prefect:
        counts = compute_keypoints.fn(args.config, overrides)
        print(f"images without keypoints: {counts}")
        result = run_finetune(args.config, overrides)
    else:
        result = finetune_flow(args.config, overrides)
    for name, rep in result["reports"].items():
        print(f"{name}: {rep['json']}")
    print(json.dumps(result["summary"], indent=2, default=str))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("finetune", help="fine-tune SapiensID on a multi-domain set (webbody-finetune flow)")
    f.add_argument("config", help="YAML with a finetune: section (configs/finetune*.yaml)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a finetune field (YAML value)")
    f.add_argument("--no-prefect", action="store_true", help="run without Prefect")
    f.set_defaults(fn=cmd_finetune)
