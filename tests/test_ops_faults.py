"""Crash safety of the whole build: `webbody build` SIGKILLed inside every stage, then re-run.

A small real corpus (photos from registry packages, served from 127.0.0.1, real YOLO11n-pose, RetinaFace
and dlib models) is built once undisturbed, watching when each stage starts writing (its first claim file,
temporary or marker) and when its roll-up appears. Then a second build directory is built by a series of
runs, each aimed at one stage: the run is SIGKILLed (with every process it started) a random offset after
that stage starts writing in that run, the offset drawn within the stage's undisturbed duration, so kills
land in query, download, persons, faces, clean and bundle alike. A kill lands in the stage that was in
progress when it struck (the first without its `stats.json`), which is what is counted. After every kill
nothing visible may be corrupt (no marker that lies about its shard); at the end every file must equal the
undisturbed build's byte for byte (stats JSON compared without wall-clock `seconds`), and one more run
must change nothing.

CI: one kill aimed at each of the six stages (a stage that is missed is aimed at again in a second series
with smaller offsets) and at least one must land in every stage. The long run (`@pytest.mark.slow`, only
when WEBBODY_FAULTS_LONG is set) does rounds of six, local and Ray executors alternating, until that many
kills have landed, and writes the tally to `benchmarks/results/faults.json`:
  WEBBODY_FAULTS_LONG=30 pytest tests/test_ops_faults.py -m slow -k long -s
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults import (
    STAGES,
    diff_trees,
    leftover_temporaries,
    run_killed_in_stage,
    run_to_end,
    stage_in_progress,
    stage_timeline,
    stage_windows,
    subprocess_env,
    tree_digests,
    visible_problems,
)

pytestmark = [pytest.mark.integration, pytest.mark.realmodel]

REPO = Path(__file__).resolve().parent.parent
# name -> (asset, variant) photos: Obama has three real photos (plus one of Biden to be cleaned away),
# Grace Hopper one photo and two re-framings; one URL is missing on the server (a counted http_404).
SUBSET = {
    "Barack Obama": [("obama.jpg", 0), ("obama2.jpg", 0), ("obama3.jpg", 0), ("biden.jpg", 0)],
    "Grace Hopper": [("grace_hopper.jpg", 0), ("grace_hopper.jpg", 1), ("grace_hopper.jpg", 2)],
}
BROKEN = [("Barack Obama", "missing/obama9.jpg")]
# Nothing is excluded: even the HTML report must come out identical.
VOLATILE_FILES: list[str] = []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus served on 127.0.0.1 for the whole module (URLs, hence sample ids, keep one port)."""
    from flows.demo import make_variant, resolve_asset_refs, serve_directory, write_url_list
    from pipeline.assets import asset_path

    root = tmp_path_factory.mktemp("fault-corpus")
    files = root / "files"
    entries = []
    for name, photos in SUBSET.items():
        for asset, variant in photos:
            from PIL import Image

            rel = f"{name.split()[-1].lower()}/{Path(asset).stem}_v{variant}.jpg"
            (files / rel).parent.mkdir(parents=True, exist_ok=True)
            make_variant(Image.open(asset_path(asset)).convert("RGB"), variant).save(files / rel, quality=92)
            entries.append((name, rel))
    entries += BROKEN
    with serve_directory(files) as base_url:
        url_list = write_url_list(entries, base_url, root / "url.lst")
        cfg = resolve_asset_refs(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()))
        cfg["query"]["inputs"] = [{"path": str(url_list), "format": "url_lst"}]
        cfg["query"]["shard_size"] = 3  # several shards per stage, so kills land between and inside shards
        cfg["run"]["executor"] = "local"
        config = root / "faults.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        yield config


def build_cmd(config: Path, output: Path, executor: str = "local") -> list[str]:
    return [sys.executable, "-m", "flows.cli", "build", str(config), "--output", str(output), "--no-prefect",
            "--set", f"run.executor={executor}"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The undisturbed build, and when each of its stages wrote (the windows kill offsets are drawn from)."""
    out = tmp_path_factory.mktemp("fault-ref") / "build"
    log = out.parent / "log.txt"
    t0 = time.monotonic()
    rc, timeline = stage_timeline(build_cmd(corpus, out), out, env=subprocess_env(), cwd=REPO, log_path=log)
    elapsed = time.monotonic() - t0
    assert rc == 0, log.read_text()[-4000:]
    digests = tree_digests(out, exclude=VOLATILE_FILES)
    assert any(k.startswith("bundle/") and k.endswith(".tar") for k in digests), "the reference built no shard"
    windows = stage_windows(timeline)
    assert sorted(windows) == sorted(STAGES), f"a stage wrote nothing or no roll-up: {timeline}"
    # (That a further run over a finished build changes nothing is checked after every kill series.)
    return out, digests, {"total_s": round(elapsed, 2), "timeline": timeline, "windows": windows}


def kill_through_stages(config: Path, out: Path, targets: list[str], windows: dict[str, float],
                        rng: random.Random, executor: str = "local", scale: float = 0.6) -> list[dict]:
    """One run per target stage (in build order), each killed a random offset, in [0, scale x the stage's
    undisturbed duration), after that stage starts writing; a target the build has already passed is skipped."""
    log = out.parent / f"{out.name}.log"
    records = []
    for stage in targets:
        current = stage_in_progress(out)
        if current == "finish" or STAGES.index(stage) < STAGES.index(current):
            records.append({"stage": stage, "killed": False, "skipped": "build already past this stage",
                            "landed_in": None})
            continue
        offset = rng.random() * scale * windows[stage]
        rec = run_killed_in_stage(build_cmd(config, out, executor), out, stage, offset, env=subprocess_env(),
                                  cwd=REPO, log_path=log)
        rec["executor"] = executor
        rec["visible_problems"] = visible_problems(out) if out.exists() else []
        records.append(rec)
        assert rec["visible_problems"] == [], f"after a kill aimed at {stage}: {rec}"
        if not rec["killed"]:
            assert rec["rc"] == 0, log.read_text()[-4000:]
            break  # the build finished: nothing left to kill in this series
    return records


def landed_per_stage(records: list[dict]) -> dict[str, int]:
    counts = {s: 0 for s in (*STAGES, "finish")}
    for r in records:
        if r.get("killed"):
            counts[r["landed_in"]] += 1
    return counts


def finish_and_compare(config: Path, out: Path, expected: dict[str, str], executor: str = "local") -> None:
    log = out.parent / f"{out.name}.log"
    assert run_to_end(build_cmd(config, out, executor), env=subprocess_env(), cwd=REPO, log_path=log) == 0, \
        log.read_text()[-4000:]
    assert leftover_temporaries(out) == [], "a re-run left half-written files behind"
    got = tree_digests(out, exclude=VOLATILE_FILES)
    assert diff_trees(expected, got) == []
    # Idempotent: one more run redoes nothing and changes nothing.
    assert run_to_end(build_cmd(config, out, executor), env=subprocess_env(), cwd=REPO, log_path=log) == 0, \
        log.read_text()[-4000:]
    assert tree_digests(out, exclude=VOLATILE_FILES) == got


def _print(name: str, records: list[dict]) -> None:
    landed = [r for r in records if r.get("killed")]
    print(f"\n[faults] {name}: {len(landed)} kills landed of {len(records)} aimed, all survived; "
          f"landed per stage: {landed_per_stage(records)}")


@pytest.mark.timeout(1800)  # ~12 min at load 20 on the shared 2 cores, over pytest's default 900 s there
def test_sigkill_in_every_stage_then_resume(corpus, reference, tmp_path):
    _, expected, timing = reference
    rng = random.Random(20251)
    records: list[dict] = []
    for series, scale in enumerate((0.6, 0.25)):
        counts = landed_per_stage(records)
        targets = [s for s in STAGES if counts[s] == 0]
        if not targets:
            break
        out = tmp_path / f"series{series}" / "build"
        out.parent.mkdir(parents=True)
        got = kill_through_stages(corpus, out, targets, timing["windows"], rng, scale=scale)
        finish_and_compare(corpus, out, expected)
        records += got
    (tmp_path / "ci.json").write_text(json.dumps({"timing": timing, "records": records}, indent=1))
    _print("ci", records)
    counts = landed_per_stage(records)
    assert all(counts[s] >= 1 for s in STAGES), f"no kill landed in some stage: {counts}; {records}"


def _write_tally(rec, records: list[dict], rounds: int, want: int, timing: dict,
                 complete: bool) -> tuple[dict[str, int], int, int]:
    from benchmarks.paired import headline

    counts = landed_per_stage(records)
    landed = sum(counts.values())
    tried = sum(1 for r in records if "skipped" not in r)
    stages_hit = sum(1 for s in STAGES if counts[s] > 0)
    state = "complete" if complete else f"partial: {rounds} round(s) so far"
    rec.write(
        {"kills_landed": headline(landed, unit="kills", target=f">= {want}",
                                  note=f"{tried} aimed over {rounds} rounds, local and Ray alternating ({state})"),
         "stages_with_landed_kills": headline(stages_hit, unit="of 6", target="== 6"),
         "survived": headline(True, target="== true",
                              note="after every round: no lying marker after any kill, byte-identical to the "
                                   "undisturbed build, and a further run changed nothing")},
        details={"complete": complete, "landed_per_stage": counts, "tried": tried, "rounds": rounds,
                 "timing": timing, "records": records},
    )
    return counts, landed, stages_hit


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)  # rounds of ~12 min each at load 30; pytest's default 900 s stopped the first try
@pytest.mark.skipif(not os.environ.get("WEBBODY_FAULTS_LONG"),
                    reason="the long fault run (~30 min): set WEBBODY_FAULTS_LONG=30 to run it")
def test_sigkill_long_run(corpus, reference, tmp_path):
    """Rounds of one kill aimed at each stage, fresh build each round, local and Ray executors alternating,
    each round compared byte for byte at the end; the tally goes to benchmarks/results/faults.json."""
    from benchmarks.paired import Recorder

    _, expected, timing = reference
    want = int(os.environ["WEBBODY_FAULTS_LONG"])
    rec = Recorder("faults", {"WEBBODY_FAULTS_LONG": want})
    rng = random.Random(1000 + want)
    records: list[dict] = []
    rounds = 0
    max_rounds = 2 * math.ceil(want / len(STAGES))
    while sum(landed_per_stage(records).values()) < want and rounds < max_rounds:
        executor = "ray" if rounds % 2 else "local"
        out = tmp_path / f"round{rounds}-{executor}" / "build"
        out.parent.mkdir(parents=True)
        # Offsets over most of each stage's window: some kills run past their stage and land in the next.
        got = kill_through_stages(corpus, out, list(STAGES), timing["windows"], rng, executor, scale=0.9)
        finish_and_compare(corpus, out, expected, executor=executor)
        for r in got:
            r["round"] = rounds
        records += got
        rounds += 1
        _print(f"round {rounds} ({executor})", got)
        # Written after every round, so a run cut short still leaves its (partial, labelled) tally.
        counts, landed, stages_hit = _write_tally(rec, records, rounds, want, timing, complete=False)
    counts, landed, stages_hit = _write_tally(rec, records, rounds, want, timing, complete=True)
    _print("long run", records)
    assert landed >= want and stages_hit == len(STAGES), counts
