"""`webbody verify|report|remove`: the bundle's dataset commands (logic in pipeline/bundle/, exit codes here).

Picked up by flows/cli.py through COMMAND_PROVIDERS (`add_commands(subparsers)`).
"""

from __future__ import annotations

import argparse
import json


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.bundle.verify import verify_main

    return verify_main(args.dir, quiet=args.quiet)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.bundle.report import report_main

    return report_main(args.dir, output=args.output)


def cmd_remove(args: argparse.Namespace) -> int:
    from flows.build import load_build_config
    from pipeline.bundle.remove import remove_subject
    from pipeline.bundle.verify import verify_main

    cfg = load_build_config(args.config, None, {}) if args.config else None
    result = remove_subject(args.dir, name=args.name, url=args.url, face=args.face, cfg=cfg)
    print(json.dumps(result))
    print("to keep the subject out of future builds, add it to query.optout_names / optout_domains")
    return verify_main(args.dir, quiet=True)


def add_commands(sub) -> None:
    v = sub.add_parser("verify", help="check every bundle shard against its index, stats and schema")
    v.add_argument("dir", help="bundle directory (<build>/bundle)")
    v.add_argument("--quiet", action="store_true", help="print only problems")
    v.set_defaults(fn=cmd_verify)

    r = sub.add_parser("report", help="write the static HTML report of a bundle")
    r.add_argument("dir", help="bundle directory (<build>/bundle)")
    r.add_argument("--output", help="HTML file (default: DIR/report.html)")
    r.set_defaults(fn=cmd_report)

    m = sub.add_parser("remove", help="remove a subject from a bundle (opt-out request)")
    m.add_argument("dir", help="bundle directory (<build>/bundle)")
    who = m.add_mutually_exclusive_group(required=True)
    who.add_argument("--name", help="identity name (case- and space-insensitive)")
    who.add_argument("--url", help="source image URL: every person cut from it")
    who.add_argument("--face", help="a photo of the subject: identities whose face center matches are removed")
    m.add_argument("--config", help="the build's YAML config (its faces models and clean thresholds; for --face)")
    m.set_defaults(fn=cmd_remove)
