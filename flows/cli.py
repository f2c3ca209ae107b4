"""`webbody`: the command line. Every error ends in a message that says what to do, and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline.runtime import ensure_offline_env

# Modules that add their own subcommands (`add_commands(subparsers)`).
COMMAND_PROVIDERS = ["flows.dataset_cli", "flows.train", "flows.end_to_end", "flows.valsets_cli", "flows.finetune"]


def _parse_overrides(items: list[str] | None) -> dict:
    from schemas.overrides import OverrideError, parse_overrides

    try:
        return parse_overrides(items)
    except OverrideError as exc:
        raise SystemExit(f"error: {exc}") from None


def cmd_build(args: argparse.Namespace) -> int:
    from flows.build import build_flow, build_plain

    fn = build_plain if args.no_prefect else build_flow
    result = fn(config_path=args.config, output=args.output, until=args.until, ray_address=args.ray_address,
                overwrite=args.overwrite, overrides=_parse_overrides(args.set))
    _print_result(result)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from flows.build import load_build_config
    from pipeline.registry import get_stage, load_plugins, run_stage

    cfg = load_build_config(args.config, args.ray_address, _parse_overrides(args.set))
    load_plugins(cfg)
    spec = get_stage(args.name)
    from pipeline import storage

    # --input/--output are paths or storage URIs (s3://...): kept as strings, resolved by pipeline.storage.
    inp = args.input or None
    if spec.needs and inp is None:
        raise SystemExit(f"error: stage '{args.name}' needs --input (the output of '{spec.needs[0]}')")
    if len(spec.needs) == 1:
        inputs = {spec.needs[0]: inp}
    else:  # multi-input stages take a build directory holding each needed stage's folder
        inputs = {n: storage.join(inp, n) for n in spec.needs}
    stats = run_stage(args.name, cfg, inputs, args.output, overwrite=args.overwrite)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pipeline import storage

    path = storage.join(args.dir, "stats.json")
    if not storage.exists(path):
        raise SystemExit(f"error: {storage.display(path)} not found: is {storage.display(args.dir)} a build or "
                         "stage output directory?")
    stats = storage.get_json(path)
    if "stages" in stats:
        print(f"{'stage':<10} {'in':>9} {'out':>9}  drops")
        for s in stats["stages"]:
            drops = ", ".join(f"{k}={v}" for k, v in (s.get("drops") or {}).items())
            print(f"{s['stage']:<10} {s.get('rows_in', ''):>9} {s.get('rows_out', ''):>9}  {drops}")
    else:
        print(json.dumps(stats, indent=2))
    return 0


def cmd_retry_downloads(args: argparse.Namespace) -> int:
    from flows.build import load_build_config
    from pipeline.download import RETRYABLE, retry_failed_urls

    cfg = load_build_config(args.config, args.ray_address, _parse_overrides(args.set))
    codes = frozenset(args.codes.split(",")) if args.codes else RETRYABLE
    result = retry_failed_urls(cfg, Path(args.dir), codes)
    print(json.dumps(result))
    if result.get("recovered"):
        print("download shards changed: re-run the later stages with --overwrite to pick up the new images")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    result = run_demo(output=args.output, use_prefect=not args.no_prefect, executor=args.executor, work=args.work)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    print(f"output:  {result['output']}")
    print(f"stats:   {result['stats']}")
    if result.get("report"):
        print(f"report:  {result['report']}")
    for s in result.get("funnel", {}).get("stages", []):
        drops = ", ".join(f"{k}={v}" for k, v in (s.get("drops") or {}).items())
        print(f"  {s['stage']:<9} in={s.get('rows_in')} out={s.get('rows_out')}  {drops}")


def cmd_models_export(args: argparse.Namespace) -> int:
    from flows.build import load_build_config
    from pipeline.models import export_models

    cfg = load_build_config(args.config, None, _parse_overrides(args.set))
    for rec in export_models(cfg, args.backend or None):
        print(json.dumps(rec))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pipeline.registry import BUILTIN_STAGES

    stages = ", ".join(BUILTIN_STAGES)
    p = argparse.ArgumentParser(prog="webbody", description="Build WebBody and train/evaluate SapiensID.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build the demo corpus end to end (no network, no Prefect server)")
    d.add_argument("--output", default="output/demo",
                   help="build directory or object-store URI, e.g. s3://bucket/demo (default: output/demo)")
    d.add_argument("--work", help="local folder for the served corpus and the generated config (default: the "
                                  "output folder; for a URI output a fixed folder under ~/.cache/webbody/demo)")
    d.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    d.add_argument("--executor", choices=["ray", "local"], default="ray")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("build", help="run the webbody-build flow")
    b.add_argument("config", help="YAML config (see configs/)")
    b.add_argument("--output", required=True, help="build directory")
    b.add_argument("--until", metavar="STAGE", help=f"stop after this stage ({stages}, or a plugin's)")
    b.add_argument("--ray-address", help="Ray cluster address (default: local Ray)")
    b.add_argument("--overwrite", action="store_true", help="redo shards made with another config")
    b.add_argument("--no-prefect", action="store_true", help="run the stages without Prefect")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    b.set_defaults(fn=cmd_build)

    s = sub.add_parser("stage", help="re-run one stage")
    s.add_argument("name", metavar="STAGE", help=f"{stages}, or a stage of the config's plugins")
    s.add_argument("--input", help="the previous stage's directory (bundle: the build directory)")
    s.add_argument("--output", required=True)
    s.add_argument("--config")
    s.add_argument("--ray-address")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_stage)

    r = sub.add_parser("retry-downloads", help="re-fetch the failed URLs of a finished download stage")
    r.add_argument("dir", help="the download stage's directory (<build>/download)")
    r.add_argument("--config", help="the build's YAML config (download settings)")
    r.add_argument("--codes", help="comma-separated status codes to retry (default: the transient ones)")
    r.add_argument("--ray-address")
    r.add_argument("--set", action="append", metavar="KEY=VALUE")
    r.set_defaults(fn=cmd_retry_downloads)

    st = sub.add_parser("stats", help="print the funnel of a build (or a stage's roll-up)")
    st.add_argument("dir")
    st.set_defaults(fn=cmd_stats)

    m = sub.add_parser("models", help="prepare the model stages' weights").add_subparsers(dest="models", required=True)
    me = m.add_parser("export", help="export the persons/faces models for their backends once (cached by checksum)")
    me.add_argument("--config", help="YAML config (default: the built-in defaults)")
    me.add_argument("--backend", action="append", choices=["onnxruntime", "openvino"], help="default: configured")
    me.add_argument("--set", action="append", metavar="KEY=VALUE")
    me.set_defaults(fn=cmd_models_export)

    for name in COMMAND_PROVIDERS:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    ensure_offline_env()
    from pipeline.assets import AssetError
    from pipeline.config import ConfigError
    from pipeline.stage import StageError
    from schemas.base import SchemaError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, StageError, SchemaError, AssetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the finished shards", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
