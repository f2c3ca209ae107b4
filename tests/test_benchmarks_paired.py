"""The measuring rules of `benchmarks/paired.py` and the docs-from-JSON rule of `benchmarks/render.py`.

- paired ratios run A and B interleaved in alternating order (AB, BA, AB, ...), after one untimed warm-up of
  each; the headline is the median of the per-pair ratios (not the ratio of medians), with min and max;
- fewer than 5 pairs is refused; targets are checked;
- `docs/benchmarks.md` (and every doc with result markers) is exactly what `render.py` makes of the committed
  JSON files: `render.py --check` exits 0 on the repository and 1 on a stale doc.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import paired, render
from benchmarks.paired import MIN_PAIRS, Recorder, check_target, headline, paired_ratio

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock that only the measured functions move, so every timing is known exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sides_alternate_after_one_warm_up_each():
    calls: list[str] = []
    p = paired_ratio(lambda: calls.append("A"), lambda: calls.append("B"), pairs=6)
    assert calls[:2] == ["A", "B"]  # warm-up, untimed
    assert calls[2:] == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert p.order == ["AB", "BA"] * 3
    assert len(p.ratios) == len(p.a_seconds) == len(p.b_seconds) == len(p.load) == 6


def test_headline_is_the_median_of_paired_ratios_not_a_ratio_of_medians():
    clock = FakeClock()
    # B's time drifts (machine load) while A is steady at 1 s; pair i: A 1 s, B as listed.
    b_times = iter([2.0, 3.0, 10.0, 1.0, 4.0])
    a_times = iter([1.0, 1.0, 5.0, 1.0, 1.0])

    def run_a():
        clock.now += next(a_times)

    def run_b():
        clock.now += next(b_times)

    p = paired_ratio(run_a, run_b, pairs=5, clock=clock, warmup=False)
    assert p.a_seconds == [1.0, 1.0, 5.0, 1.0, 1.0]
    assert p.b_seconds == [2.0, 3.0, 10.0, 1.0, 4.0]
    assert p.ratios == [2.0, 3.0, 2.0, 1.0, 4.0]          # time B / time A, pair by pair
    assert p.median == 2.0
    ratio_of_medians = statistics.median(p.b_seconds) / statistics.median(p.a_seconds)
    assert ratio_of_medians == 3.0 and p.median != ratio_of_medians
    s = p.summary(target=">= 1.5")
    assert (s["value"], s["min"], s["max"], s["pairs"], s["met"]) == (2.0, 1.0, 4.0, 5, True)
    assert s["samples"]["order"] == ["AB", "BA", "AB", "BA", "AB"]


def test_work_amounts_make_rates():
    clock = FakeClock()

    def side(seconds: float, items: int):
        def run():
            clock.now += seconds
            return items
        return run

    # A: 10 items in 2 s (5/s); B: 3 items in 1 s (3/s): rate ratio 5/3 in every pair.
    p = paired_ratio(side(2.0, 10), side(1.0, 3), pairs=5, clock=clock, warmup=False,
                     work_a=lambda n: n, work_b=lambda n: n)
    assert all(r == pytest.approx(5 / 3) for r in p.ratios)


def test_before_runs_untimed_before_every_call():
    clock = FakeClock()
    seen: list[str] = []

    def before():
        seen.append("setup")
        clock.now += 100.0  # expensive set-up must not count

    def run():
        seen.append("run")
        clock.now += 1.0

    p = paired_ratio(run, run, pairs=5, clock=clock, warmup=False, before=before)
    assert p.a_seconds == [1.0] * 5 and p.b_seconds == [1.0] * 5
    assert seen == ["setup", "run"] * 10


def test_too_few_pairs_are_refused():
    with pytest.raises(ValueError, match=">= 5"):
        paired_ratio(lambda: None, lambda: None, pairs=MIN_PAIRS - 1)
    assert len(paired_ratio(lambda: None, lambda: None, pairs=2, min_pairs=2).ratios) == 2


@pytest.mark.parametrize("value,target,met", [
    (0.95, ">= 0.9", True), (0.85, ">= 0.9", False), (0.9, ">=0.9", True), (3.0, "< 2", False),
    (1.0, "<= 1", True), (True, "== true", True), (False, "== true", False), (2.5, "> 2.5", False),
    (1e-3, "< 1e-2", True), (None, ">= 1", None), (1.0, None, None),
])
def test_targets(value, target, met):
    assert check_target(value, target) is met
    assert headline(value, target=target)["met"] is met


def test_a_bad_target_is_an_error():
    with pytest.raises(ValueError, match="bad target"):
        check_target(1.0, "about 1")


def test_recorder_writes_one_layout_and_refuses_bare_numbers(tmp_path):
    rec = Recorder("demo", {"pairs": 5, "out": tmp_path})
    p = paired_ratio(lambda: None, lambda: None, pairs=5)
    out = rec.write({"speedup": p.summary(target=">= 0")}, details={"rows": [{"a": 1}]}, path=tmp_path / "demo.json")
    doc = json.loads(out.read_text())
    assert doc["name"] == "demo" and doc["speedup"] == doc["headline"]["speedup"]["value"]
    assert doc["headline"]["speedup"]["pairs"] == 5 and doc["args"]["out"] == str(tmp_path)
    env = doc["env"]
    assert {"loadavg_start", "loadavg_end", "versions", "argv", "cpus"} <= env.keys()
    assert "torch" in env["versions"]
    with pytest.raises(TypeError, match="headline"):
        rec.write({"speedup": 1.5}, path=tmp_path / "bad.json")  # type: ignore[dict-item]


# -- render ----------------------------------------------------------------------------------------------


def _results(tmp: Path, value: float) -> Path:
    res = tmp / "results"
    res.mkdir(exist_ok=True)
    rec = Recorder("demo", {})
    rec.write({"speedup": headline(value, 1.0, 3.0, pairs=5, target=">= 1.5")},
              details={"rows": [{"setting": "a", "s": 1.25}, {"setting": "b", "s": 2.5}]}, path=res / "demo.json")
    return res


def test_render_fills_blocks_from_json_and_check_catches_a_stale_doc(tmp_path):
    res = _results(tmp_path, 2.0)
    doc = tmp_path / "doc.md"
    doc.write_text("# T\n\n<!-- results:demo -->\n<!-- /results:demo -->\n\ntext\n"
                   "<!-- results:demo:details.rows -->\nhand-typed 9.99\n<!-- /results:demo:details.rows -->\n")
    run = [sys.executable, str(REPO / "benchmarks" / "render.py"), "--results", str(res), str(doc)]
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 1  # empty blocks: stale
    assert subprocess.run(run, capture_output=True).returncode == 0
    text = doc.read_text()
    assert "| `demo.json` | `speedup` | 2 | 1 .. 3 | 5 | >= 1.5 | met |" in text
    assert "| a | 1.25 |" in text and "9.99" not in text and text.endswith("<!-- /results:demo:details.rows -->\n")
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 0
    # New figures in the JSON: the doc is stale until re-rendered.
    _results(tmp_path, 1.2)
    checked = subprocess.run(run + ["--check"], capture_output=True, text=True)
    assert checked.returncode == 1 and "out of date" in checked.stderr
    assert render.render_doc(doc.read_text(), res).count("**not met**") == 1


def test_render_shows_no_figure_for_a_missing_result_file(tmp_path):
    res = _results(tmp_path, 2.0)
    text = render.render_doc("<!-- results:absent -->\nold 1.23\n<!-- /results:absent -->\n", res)
    assert "not committed yet" in text and "1.23" not in text


def test_render_refuses_an_unclosed_marker(tmp_path):
    res = _results(tmp_path, 2.0)
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:demo -->\nold figure\n")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), "--results", str(res), "--check",
                        str(doc)], capture_output=True, text=True)
    assert r.returncode == 1 and "without their closing pair" in r.stderr


def test_repository_docs_agree_with_committed_results():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render.py"), "--check"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = (REPO / "docs" / "benchmarks.md").read_text()
    # Every result file is rendered somewhere in docs/benchmarks.md (its own block or the headline table).
    for path in sorted(paired.RESULTS.glob("*.json")):
        assert f"`{path.stem}.json`" in text, f"{path.name} is not rendered in docs/benchmarks.md"
