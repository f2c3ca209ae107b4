"""`webbody-end-to-end`: build WebBody -> train SapiensID on its shards -> evaluate on HELD-OUT identities.

The build config (``configs/*.yaml``) drives the build; a separate train config (``train:`` and optionally
``evaluate:`` sections, default ``configs/train_demo.yaml``) drives training, with ``train_shards`` (the build's
bundle) and ``output_dir`` (``<output>/train``) filled in when absent. ``demo=True`` builds the demo corpus
(served from 127.0.0.1 like ``webbody demo``) instead of ``config_path``.

Evaluation never uses training identities. It runs on the config's ``evaluate.datasets`` plus one held-out
set: the bundle's WebBody-test split (identities the bundle keeps out of training, `pipeline/bundle/splits.py`;
checked against the bundle index: no test identity is a training identity), or, when the bundle has no test
split (tiny corpora such as the demo's have too few eligible identities), a generated held-out set of
identities that appear nowhere in the build (`sapiensid.data.synthetic`). `end_to_end.json` says which
(``evaluation.held_out``); a score on generated figures is a smoke check of the evaluation path, not a
measure of recognising real people.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from pipeline.runtime import ensure_offline_env


def _train_section(config_path: str | None) -> dict[str, Any]:
    if not config_path:
        return {}
    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    return dict(raw.get("train", {}) or {}) if isinstance(raw, dict) else {}


def plan_training(config_path: str | None, output: Path, bundle: Path,
                  train_overrides: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """The train YAML this run uses (written to <output>/train_config.yaml) and its overrides."""
    section = _train_section(config_path)
    section.setdefault("train_shards", str(bundle))
    section.setdefault("output_dir", str(output / "train"))
    section.update(train_overrides or {})
    path = output / "train_config.yaml"
    path.write_text(yaml.safe_dump({"train": section}, sort_keys=False))
    return path, section


GENERATED_HELD_OUT = {"identities": 8, "per_identity": 4, "label_offset": 900_000, "image_seed": 7}


def _identities_by_split(bundle: Path) -> dict[str, set[str]]:
    import pyarrow.parquet as pq

    index = bundle / "index.parquet"
    if not index.exists():
        raise RuntimeError(f"{bundle} has shards but no index.parquet: cannot check the held-out identities")
    t = pq.read_table(index, columns=["split", "identity"]).to_pydict()
    out: dict[str, set[str]] = {}
    for split, ident in zip(t["split"], t["identity"]):
        out.setdefault(split, set()).add(ident)
    return out


def _generated_held_out(root: Path) -> Path:
    """Write the generated held-out set once (a re-run reuses it: same seeds, same images)."""
    from sapiensid.data.synthetic import write_shards

    if (root / "index.parquet").exists():
        return root
    tmp = root.with_name(f".{root.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    g = GENERATED_HELD_OUT
    write_shards(tmp, g["identities"], g["per_identity"], split="test", image_seed=g["image_seed"],
                 label_offset=g["label_offset"])
    tmp.rename(root)
    return root


def eval_datasets(config_path: str | None, bundle: Path, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The evaluation sets of a run and a description of its held-out set (never the training split)."""
    from flows.train import datasets_from_config

    datasets = datasets_from_config(config_path)
    by_split = _identities_by_split(bundle)
    train_ids = by_split.get("train", set())
    if list(bundle.glob("webbody-test-*.tar")):
        test_ids = by_split.get("test", set())
        shared = sorted(test_ids & train_ids)
        if shared:
            raise RuntimeError(f"{bundle}: {len(shared)} test identities are also training identities "
                               f"(e.g. {shared[:3]}): refusing to report a held-out score")
        datasets.append({"name": "webbody_test", "kind": "webbody_shards", "path": str(bundle), "split": "test"})
        held = {"dataset": "webbody_test", "source": "the bundle's WebBody-test split",
                "identities": len(test_ids), "identities_also_in_training": 0}
    else:
        root = _generated_held_out(out / "held_out_generated")
        gen_ids = _identities_by_split(root).get("test", set())
        shared = sorted(gen_ids & train_ids)
        if shared:
            raise RuntimeError(f"generated held-out identities {shared[:3]} are training identities")
        datasets.append({"name": "generated_held_out", "kind": "webbody_shards", "path": str(root), "split": "test"})
        held = {"dataset": "generated_held_out",
                "source": "generated identities (sapiensid.data.synthetic), none of them in the build",
                "why": "the bundle has no test split (too few identities eligible for WebBody-test)",
                "identities": len(gen_ids), "identities_also_in_training": 0,
                "caveat": "a smoke check of the evaluation path on drawn figures, not a score on real people"}
    held["training_identities"] = len(train_ids)
    held["training_split_evaluated"] = False
    return datasets, held


DEFAULT_TRAIN_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "train_demo.yaml")


def _build(config_path: str | None, out: Path, ray_address: str | None, use_prefect: bool, demo: bool) -> dict:
    from flows.build import build_flow, build_plain

    fn = build_flow if use_prefect else build_plain
    if not demo:
        return fn(config_path=config_path, output=str(out), ray_address=ray_address)
    from flows.demo import DEFAULT_PORT, prepare_demo_config, serve_directory

    files = out / "demo_corpus" / "files"
    files.mkdir(parents=True, exist_ok=True)
    port_file = out / "demo_corpus" / "port"  # sample ids contain the port: reuse it on a re-run
    port = int(port_file.read_text()) if port_file.exists() else DEFAULT_PORT
    with serve_directory(files, port) as base_url:
        port_file.write_text(base_url.rsplit(":", 1)[1])
        cfg = prepare_demo_config(out, base_url, "local" if not use_prefect else "ray")
        return fn(config_path=str(cfg), output=str(out), ray_address=ray_address)


def run_end_to_end(config_path: str | None, output: str, ray_address: str | None,
                   train_overrides: dict[str, Any] | None, use_prefect: bool, demo: bool = False,
                   train_config: str | None = None) -> dict[str, Any]:
    from flows.train import _run_evaluation, _run_training, evaluate_flow, train_flow

    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    built = _build(config_path, out, ray_address, use_prefect, demo)
    bundle = Path(built.get("bundle", out / "bundle"))
    config_path = train_config or DEFAULT_TRAIN_CONFIG
    if not list(bundle.glob("webbody-*.tar")):
        raise RuntimeError(f"the build produced no shards in {bundle}; see {out / 'stats.json'} for the funnel")
    train_cfg, _ = plan_training(config_path, out, bundle, train_overrides)
    if use_prefect:
        trained = train_flow(str(train_cfg))
    else:
        trained = _run_training(str(train_cfg), None, 1, 0, None, False)
    datasets, held_out = eval_datasets(config_path, bundle, out)
    eval_out = str(out / "evaluation")
    if use_prefect:
        evaluated = evaluate_flow(trained["checkpoint"], datasets, None, eval_out)
    else:
        evaluated = _run_evaluation(trained["checkpoint"], datasets, eval_out, "auto", 32, True)
    result = {
        "build": {k: v for k, v in built.items() if k != "funnel"},
        "checkpoint": trained["checkpoint"],
        "train": trained,
        "evaluation": {"json": evaluated["json"], "markdown": evaluated["markdown"], "held_out": held_out},
    }
    (out / "end_to_end.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"evaluated on held-out identities only: {held_out['dataset']} ({held_out['source']}, "
          f"{held_out['identities']} identities, none of the {held_out['training_identities']} training ones)")
    return result


@flow(name="webbody-end-to-end", log_prints=True)
def end_to_end_flow(config_path: str | None = None, output: str = "output/end_to_end",
                    ray_address: str | None = None, train_overrides: dict[str, Any] | None = None,
                    demo: bool = False, train_config: str | None = None) -> dict[str, Any]:
    """Build -> train -> evaluate, each step its own (sub)flow so a re-run resumes the finished parts."""
    ensure_offline_env()
    return run_end_to_end(config_path, output, ray_address, train_overrides, True, demo, train_config)


def cmd_end_to_end(args: argparse.Namespace) -> int:
    from sapiensid.train import parse_overrides

    overrides = parse_overrides(args.set or [])
    demo = args.config == "demo"
    config = None if demo else args.config
    if args.no_prefect:
        result = run_end_to_end(config, args.output, args.ray_address, overrides, False, demo, args.train_config)
    else:
        result = end_to_end_flow(config, args.output, args.ray_address, overrides, demo, args.train_config)
    print(json.dumps(result, indent=2, default=str))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("end-to-end", help="build -> train -> evaluate (webbody-end-to-end flow)")
    p.add_argument("config", help="build YAML config, or 'demo' for the demo corpus")
    p.add_argument("--train-config", help="YAML with train: (and evaluate:) sections (default configs/train_demo.yaml)")
    p.add_argument("--output", default="output/end_to_end")
    p.add_argument("--ray-address")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train field")
    p.add_argument("--no-prefect", action="store_true")
    p.set_defaults(fn=cmd_end_to_end)
