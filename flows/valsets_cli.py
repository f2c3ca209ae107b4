"""`webbody valsets build`: validation-set identity centers for the clean stage's overlap removal."""

from __future__ import annotations

import argparse
import json


def cmd_valsets_build(args: argparse.Namespace) -> int:
    from flows.build import load_build_config
    from flows.cli import _parse_overrides
    from pipeline.valsets import build_valset_centers

    cfg = load_build_config(args.config, None, _parse_overrides(args.set))
    report = build_valset_centers(args.name, args.source, args.output, cfg.faces, batch_size=args.batch_size)
    print(json.dumps(report, indent=2))
    print(f"add it to the build config: clean.valsets: [{args.output}]")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("valsets", help="validation-set centers (LFW, CPLFW, CFP-FP, AgeDB-30, CALFW)")
    vsub = v.add_subparsers(dest="valsets_command", required=True)
    b = vsub.add_parser("build", help="embed a verification .bin or an identity-folder set into a center file")
    b.add_argument("--name", required=True, help="set name, e.g. lfw, cplfw, cfp_fp, agedb_30, calfw")
    b.add_argument("--source", required=True, help="insightface .bin file, or a folder with one sub-folder per identity")
    b.add_argument("--output", required=True, help="center file to write (.parquet)")
    b.add_argument("--config", default=None, help="build config whose `faces` section names the models")
    b.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override, e.g. faces.embedder=dlib (must match the build's faces stage)")
    b.add_argument("--batch-size", type=int, default=64)
    b.set_defaults(fn=cmd_valsets_build)
