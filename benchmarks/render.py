"""Render the tables of `docs/benchmarks.md` (and other docs) from `benchmarks/results/*.json`.

Prose in the docs is written by hand; every *figure* sits between markers and is generated here, so a doc
and its JSON cannot disagree:

    <!-- results:headlines -->             every headline of every result file, one table
    <!-- /results:headlines -->
    <!-- results:NAME -->                  the headlines of results/NAME.json, with spread and conditions
    <!-- /results:NAME -->
    <!-- results:NAME:details.PATH -->     a list of dicts (or a dict of dicts) at that path, as a table
    <!-- /results:NAME:details.PATH -->

Usage: python benchmarks/render.py [--check] [DOC ...]   (default: every doc with a results block)
`--check` writes nothing and exits 1 when a doc is out of date (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def default_docs() -> list[str]:
    """Every doc that holds a results block: a doc left off a fixed list would go stale unnoticed."""
    paths = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    return [str(p.relative_to(ROOT)) for p in paths if p.exists() and "<!-- results:" in p.read_text()]


BLOCK = re.compile(r"(<!-- results:(?P<key>[^ ]+?) -->\n)(?P<body>.*?)(<!-- /results:(?P=key) -->)", re.S)


def load(name: str, results: Path = RESULTS) -> dict:
    path = results / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"render: {path} does not exist (run benchmarks/{name}.py first)")
    return json.loads(path.read_text())


def fmt(v: Any, digits: int | None = None) -> str:
    """A result value as table text: "-" when missing, yes/no for flags, lists joined, markdown-safe. Floats
    get the docs' rule (3 significant digits, 1 decimal from 10, grouped thousands from 1000), or `digits`
    significant digits (the console table that `benchmarks/paired.py` prints)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if digits is not None:
            return f"{v:.{digits}g}"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, list | tuple):
        return ", ".join(fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _met(h: dict) -> str:
    met = h.get("met")
    return "" if met is None else ("met" if met else "**not met**")


def _spread(h: dict) -> str:
    if h.get("min") is None and h.get("max") is None:
        return "-"
    return f"{fmt(h.get('min'))} .. {fmt(h.get('max'))}"


def _conditions(doc: dict) -> str:
    env = doc.get("env", {})
    la0, la1 = env.get("loadavg_start"), env.get("loadavg_end")
    load_s = f"load {fmt(la0[0]) if la0 else '?'} -> {fmt(la1[0]) if la1 else '?'}"
    return f"{env.get('started', '?')}, {load_s}, {env.get('cpus', '?')} CPUs"


def headline_rows(name: str, doc: dict) -> list[str]:
    rows = []
    for key, h in doc.get("headline", {}).items():
        unit = f" {h['unit']}" if h.get("unit") and h["unit"] != "x" else ""
        note = f" ({fmt(h['note'])})" if h.get("note") else ""
        rows.append(f"| `{name}.json` | `{key}` | {fmt(h.get('value'))}{unit}{note} | {_spread(h)} | "
                    f"{fmt(h.get('pairs'))} | {fmt(h.get('target'))} | {_met(h)} |")
    if not doc.get("headline"):
        rows.append(f"| `{name}.json` | - | (no paired headline in this file) | - | - | - | |")
    return rows


HEAD = ["| file | key | value | spread (min .. max) | pairs | target | |", "|---|---|---|---|---|---|---|"]


def render_headlines(results: Path = RESULTS) -> str:
    lines = list(HEAD)
    for path in sorted(results.glob("*.json")):
        lines += headline_rows(path.stem, json.loads(path.read_text()))
    return "\n".join(lines) + "\n"


def render_one(name: str, results: Path = RESULTS) -> str:
    doc = load(name, results)
    lines = list(HEAD) + headline_rows(name, doc)
    lines.append("")
    if "env" in doc:
        lines.append(f"Measured {_conditions(doc)}; arguments `{fmt(doc['env'].get('argv') or [])}`.")
    else:
        lines.append("Written before `benchmarks/paired.py`: no paired headline, conditions not recorded; "
                     "to be re-measured.")
    return "\n".join(lines) + "\n"


def _dig(doc: dict, path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        else:
            raise SystemExit(f"render: no {path!r} in results")
    return cur


def render_table(name: str, path: str, results: Path = RESULTS) -> str:
    data = _dig(load(name, results), path)
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        rows = [{"": k, **v} for k, v in data.items()]
    elif isinstance(data, list) and all(isinstance(v, dict) for v in data):
        rows = data
    elif isinstance(data, dict):
        rows = [{"key": k, "value": v} for k, v in data.items()]
    else:
        raise SystemExit(f"render: {name}:{path} is not a table")
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, dict):
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def render_key(key: str, results: Path = RESULTS) -> str:
    if key == "headlines":
        return render_headlines(results)
    name, _, path = key.partition(":")
    if not (results / f"{name}.json").exists():
        # A section written before its result file is committed shows no figure (and goes stale, for
        # --check, as soon as the file arrives).
        return f"(`benchmarks/results/{name}.json` is not committed yet: no figures.)\n"
    return render_table(name, path, results) if path else render_one(name, results)


def render_doc(text: str, results: Path = RESULTS) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_key(m.group("key"), results) + m.group(4), text)


OPEN = re.compile(r"<!-- results:(?P<key>[^ ]+?) -->")
CLOSE = re.compile(r"<!-- /results:(?P<key>[^ ]+?) -->")


def unmatched_markers(text: str) -> list[str]:
    """Keys whose opening and closing markers do not pair up (a block that would silently never render)."""
    paired = [m.group("key") for m in BLOCK.finditer(text)]
    opened = [m.group("key") for m in OPEN.finditer(text)]
    closed = [m.group("key") for m in CLOSE.finditer(text)]
    return sorted({k for k in opened + closed if opened.count(k) != paired.count(k) or closed.count(k) != paired.count(k)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("docs", nargs="*", help="docs to render (default: every doc with a results block)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a doc is out of date; write nothing")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSON files")
    args = ap.parse_args(argv)
    stale = []
    for rel in args.docs or default_docs():
        path = ROOT / rel
        if not path.exists():
            continue
        old = path.read_text()
        orphans = unmatched_markers(old)
        if orphans:
            print(f"{rel}: result markers without their closing pair: {', '.join(orphans)}", file=sys.stderr)
            return 1
        new = render_doc(old, args.results)
        if new != old:
            stale.append(rel)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python benchmarks/render.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print("rendered: " + (", ".join(stale) if stale else "nothing changed"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
