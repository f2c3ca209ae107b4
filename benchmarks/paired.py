"""One way to measure and record a figure, used by every script in `benchmarks/`.

A ratio is a *paired* measurement: side A and side B run interleaved in alternating order (A B, B A, A B,
...), several pairs, and the headline is the median of the per-pair ratios with the min and max beside it.
Both sides get the same inputs and are timed by the same clock (`wall` or `cpu`), so machine noise that
lasts longer than a pair falls on both. Every result file records the load average before and after, the
script's arguments and the versions of the libraries involved, because this machine is shared: a figure
taken at load 12 is not one taken at load 1, and the JSON says which it was.

Result files (`benchmarks/results/<name>.json`) have one layout:

    {"name": ..., "headline": {KEY: {"value": v, "min": lo, "max": hi, "pairs": n, "unit": ...,
                                     "target": ">= 0.9" | null, "met": true | false | null, "note": ...}},
     KEY: v, ...                      # every headline value also at top level, for scripts that read it
     "details": {...}, "args": {...}, "env": {...}}

`docs/benchmarks.md` tables are rendered from these files by `benchmarks/render.py`, never typed by hand.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.render import fmt

RESULTS = Path(__file__).resolve().parent / "results"

MIN_PAIRS = 5  # a headline ratio needs at least this many pairs (lower it only for tests of this module)

DEFAULT_PACKAGES = ("torch", "numpy", "pyarrow", "ray", "onnxruntime", "ultralytics", "img2dataset",
                    "scikit-learn", "openvino", "peft", "faiss-cpu")


def _clock(kind: str | Callable[[], float]) -> Callable[[], float]:
    if callable(kind):  # an injected clock (tests of this module)
        return kind
    if kind == "wall":
        return time.perf_counter
    if kind == "cpu":
        return time.process_time
    raise ValueError(f"unknown clock {kind!r}: use 'wall' or 'cpu'")


@dataclass
class Paired:
    """The outcome of `paired_ratio`: per-pair times of both sides and their ratios."""

    a_seconds: list[float]
    b_seconds: list[float]
    ratios: list[float]          # one per pair: work rate of A over work rate of B (= time B / time A)
    order: list[str]             # which side ran first in each pair ("AB" or "BA")
    clock: str
    extra: dict = field(default_factory=dict)
    load: list[float | None] = field(default_factory=list)  # 1-min load average at the start of each pair

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def summary(self, unit: str = "x", target: str | None = None, note: str | None = None) -> dict:
        return headline(self.median, lo=min(self.ratios), hi=max(self.ratios), pairs=len(self.ratios),
                        unit=unit, target=target, note=note,
                        samples={"ratios": [round(r, 4) for r in self.ratios],
                                 "a_seconds": [round(s, 4) for s in self.a_seconds],
                                 "b_seconds": [round(s, 4) for s in self.b_seconds],
                                 "order": self.order, "clock": self.clock, "load_1m": self.load})


def paired_ratio(run_a: Callable[[], Any], run_b: Callable[[], Any], pairs: int = MIN_PAIRS,
                 clock: str | Callable[[], float] = "wall", warmup: bool = True,
                 work_a: Callable[[Any], float] | None = None, work_b: Callable[[Any], float] | None = None,
                 before: Callable[[], Any] | None = None, min_pairs: int = MIN_PAIRS) -> Paired:
    """Time `run_a` and `run_b` interleaved in alternating order; ratio = rate(A) / rate(B) per pair.

    Without `work_*` both sides are assumed to do the same work and the ratio is time(B) / time(A).
    With `work_a`/`work_b` (functions of each call's return value giving its amount of work, e.g. images
    processed) the ratio is (work_a / t_a) / (work_b / t_b). One warm-up call of each side runs first
    and is not counted (model loads, caches), unless `warmup=False`. `before`, when given, runs untimed
    before every call of either side (e.g. to empty an output directory, so both sides start alike).
    Fewer than `min_pairs` (default 5) pairs is refused: a median of two ratios is not a headline.
    """
    if pairs < max(1, min_pairs):
        raise ValueError(f"pairs must be >= {max(1, min_pairs)} (got {pairs})")
    tick = _clock(clock)
    clock_name = clock if isinstance(clock, str) else getattr(clock, "__name__", "custom")
    if warmup:
        run_a()
        run_b()
    a_s: list[float] = []
    b_s: list[float] = []
    ratios: list[float] = []
    order: list[str] = []

    load: list[float | None] = []

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        if before is not None:
            before()
        t0 = tick()
        out = fn()
        return tick() - t0, out

    for i in range(pairs):
        la = loadavg()
        load.append(la[0] if la else None)
        if i % 2 == 0:
            ta, ra = timed(run_a)
            tb, rb = timed(run_b)
            order.append("AB")
        else:
            tb, rb = timed(run_b)
            ta, ra = timed(run_a)
            order.append("BA")
        ta, tb = max(ta, 1e-9), max(tb, 1e-9)
        wa = work_a(ra) if work_a else 1.0
        wb = work_b(rb) if work_b else 1.0
        a_s.append(ta)
        b_s.append(tb)
        ratios.append((wa / ta) / (wb / tb))
    return Paired(a_s, b_s, ratios, order, clock_name, load=load)


def repeated(run: Callable[[], Any], repeats: int = 5, clock: str | Callable[[], float] = "wall",
             warmup: bool = True) -> dict:
    """A single-sided figure (a time, a rate): median with min and max over `repeats` runs."""
    tick = _clock(clock)
    if warmup:
        run()
    times = []
    for _ in range(repeats):
        t0 = tick()
        run()
        times.append(tick() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times,
            "clock": clock if isinstance(clock, str) else "custom"}


def headline(value: float | int | bool | str | None, lo: float | None = None, hi: float | None = None,
             pairs: int | None = None, unit: str = "", target: str | None = None, note: str | None = None,
             samples: dict | None = None) -> dict:
    """One headline figure with its spread and its target; `met` is computed from `target` when given."""
    out: dict[str, Any] = {"value": _round(value), "min": _round(lo), "max": _round(hi), "pairs": pairs,
                           "unit": unit, "target": target, "met": check_target(value, target)}
    if note:
        out["note"] = note
    if samples:
        out["samples"] = samples
    return out


def check_target(value: Any, target: str | None) -> bool | None:
    """`target` is '>= X', '<= X', '> X', '< X' or '== X' (X a number, or true/false)."""
    if target is None or value is None:
        return None
    m = _TARGET.fullmatch(target.strip())
    if not m:
        raise ValueError(f"bad target {target!r}: use '>= 0.9', '< 2', '== true', ...")
    op, rhs = m.group("op"), m.group("rhs")
    want: Any = (rhs == "true") if rhs in ("true", "false") else float(rhs)
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b, "==": lambda a, b: a == b}
    return bool(ops[op](value, want))


_TARGET = re.compile(r"(?P<op>>=|<=|==|>|<)\s*(?P<rhs>true|false|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    return v


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


class Recorder:
    """Collects a benchmark's environment from start to finish and writes its result file.

        rec = Recorder("persons", args)            # notes load average and time at start
        ... measure ...
        rec.write(headlines={"ratio_x": p.summary(target=">= 0.9")}, details={...})
    """

    def __init__(self, name: str, args: Any = None, packages: tuple[str, ...] = DEFAULT_PACKAGES):
        self.name = name
        self.args = vars(args) if args is not None and hasattr(args, "__dict__") else (args or {})
        self.packages = packages
        self.load_start = loadavg()
        self.t0 = time.time()

    def env(self) -> dict:
        return {
            "loadavg_start": self.load_start,
            "loadavg_end": loadavg(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
            "wall_seconds": round(time.time() - self.t0, 1),
            "argv": sys.argv[1:],
            "versions": versions(self.packages),
            "shared_machine_note": "2-core shared machine: load average is recorded; compare paired ratios, "
                                   "not absolute rates, across runs",
        }

    def write(self, headlines: dict[str, dict], details: dict | None = None,
              path: Path | None = None) -> Path:
        for key, h in headlines.items():
            if not isinstance(h, dict) or "value" not in h:
                raise TypeError(f"headline {key!r} must come from headline() or Paired.summary()")
        doc: dict[str, Any] = {"name": self.name, "headline": headlines}
        for key, h in headlines.items():
            doc[key] = h["value"]
        doc["details"] = details or {}
        doc["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.args.items()}
        doc["env"] = self.env()
        path = path or RESULTS / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
        print_table(self.name, headlines, doc["env"])
        return path


def print_table(name: str, headlines: dict[str, dict], env: dict | None = None) -> None:
    rows = [("key", "value", "min", "max", "pairs", "target", "met")]
    for k, h in headlines.items():
        value, lo, hi, pairs, met = (fmt(h.get(c), digits=4) for c in ("value", "min", "max", "pairs", "met"))
        rows.append((k, value, lo, hi, pairs, h.get("target") or "", met))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    print(f"== {name}")
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if env:
        print(f"load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}, "
              f"{env.get('wall_seconds')} s")
