"""The whole demo build (query -> bundle, then verify and the report) with its output on S3 (the moto server).

Opt-in (`WEBBODY_DEMO_S3=1`): four demo builds with real models take ~4 x 40 s on an idle 2-core machine and
several minutes each under load, more than the suite's budget. What it checks, against one local build of the
same corpus and config (the corpus is served from one local folder on one port for every build, so URLs,
sample ids and config hashes are the same):

- every object of the S3 build is the local build's file, byte for byte: parquet shards, markers,
  `_stage.json`, tar shards, `index.parquet`, `centers.parquet`, `report.html`; stats JSON is compared with
  its wall-clock fields (`seconds`, `*_seconds`, the `run` block) removed;
- listing and marker requests of every stage, counted on the S3 API with a wrapped s3fs, are at most 3 x the
  stage's shards (see `SHARDS` for what a stage's shards are);
- a build to S3 killed with SIGKILL twice (its process group), then run to the end, gives the same objects.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import flows.build as build_module
from flows.demo import run_demo
from pipeline import storage
from pipeline.shards import DatasetDir
from tests.faults import REPO, VOLATILE_JSON_KEYS, _strip_keys, run_or_kill, subprocess_env
from tests.servers import free_port
from tests.test_storage_s3 import CountingS3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("WEBBODY_DEMO_S3") != "1",
                       reason="opt-in: WEBBODY_DEMO_S3=1 (four real-model demo builds, minutes)"),
]


def _normalised(name: str, data: bytes) -> bytes:
    """Stats JSON without its wall-clock fields; every other object as it is."""
    if name.endswith(".json") and "stats" in name.rsplit("/", 1)[-1]:
        return json.dumps(_strip_keys(json.loads(data), VOLATILE_JSON_KEYS), sort_keys=True).encode()
    return data


def _s3_objects(uri: str) -> dict[str, bytes]:
    fs, path = storage.resolve(uri)
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}


def _local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _differences(expected: dict[str, bytes], got: dict[str, bytes]) -> list[str]:
    out = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    out += [f"extra {k}" for k in sorted(set(got) - set(expected))]
    out += [f"differs {k}" for k in sorted(set(expected) & set(got))
            if _normalised(k, expected[k]) != _normalised(k, got[k])]
    return out


def _is_marker(key: str) -> bool:
    return key.endswith(".done")


def _shards(build: Path) -> dict[str, int]:
    """A stage's shards: what it commits, or for the bundle what it reads.

    query ... faces: their shards (one per manifest shard). clean: the shards all its planned passes commit
    (`_names`, each `_merge/rN` round, `_dedup`, the selection; each pass is a stage directory on the
    contract with its own roll-up). bundle: the shards of its three inputs (clean, persons, faces), whose
    markers planning checks; it commits fewer (one tar for the demo).
    """
    st = {n: json.loads((build / n / "stats.json").read_text()) for n in
          ("query", "download", "persons", "faces", "clean")}
    out = {n: st[n]["shards"] for n in ("query", "download", "persons", "faces")}
    out["clean"] = sum(json.loads(f.read_text())["shards"] for f in (build / "clean").rglob("stats.json")
                       if not f.name.startswith("part-"))
    out["bundle"] = st["clean"]["shards"] + st["persons"]["shards"] + st["faces"]["shards"]
    return out


def _run_cli(output: str, work: Path, kill_after: float | None = None) -> bool:
    """`webbody demo --output OUTPUT` in its own process group; SIGKILLed after `kill_after` s (returns False)."""
    cmd = [sys.executable, "-m", "flows.cli", "demo", "--output", output, "--no-prefect", "--executor", "local",
           "--work", str(work)]
    return run_or_kill(cmd, kill_after, 1800, cwd=REPO, env=subprocess_env())


def test_demo_build_on_s3_is_the_local_build_and_survives_sigkill(s3_bucket, tmp_path, monkeypatch, capsys):
    work, port = tmp_path / "work", free_port()
    t0 = time.perf_counter()
    local = run_demo(str(tmp_path / "local"), use_prefect=False, executor="local", work=work, port=port)
    local_s = time.perf_counter() - t0
    assert local.get("verified") is True
    local_build = tmp_path / "local" / "build"
    expected = _local_objects(local_build)
    assert any(k.startswith("bundle/webbody-") and k.endswith(".tar") for k in expected), "the demo built no shard"

    # -- the same build to S3, every S3 API call counted, split by stage -----------------------------------------
    CountingS3.calls = []
    storage.register_scheme("s3", lambda: CountingS3(use_listings_cache=False, skip_instance_cache=True))
    marks: list[tuple[str, int]] = []
    run_one, finish = build_module.run_one_stage, build_module.finish_build

    def counted_stage(name, *a, **k):
        marks.append((name, len(CountingS3.calls)))
        return run_one(name, *a, **k)

    def counted_finish(*a, **k):
        marks.append(("verify+report", len(CountingS3.calls)))
        return finish(*a, **k)

    monkeypatch.setattr(build_module, "run_one_stage", counted_stage)
    monkeypatch.setattr(build_module, "finish_build", counted_finish)
    t0 = time.perf_counter()
    try:
        remote = run_demo(f"{s3_bucket}/demo", use_prefect=False, executor="local", work=work, port=port)
    finally:
        storage.register_scheme("s3", storage._s3)
    s3_s = time.perf_counter() - t0
    marks.append(("end", len(CountingS3.calls)))
    assert remote.get("verified") is True and remote["report"].startswith(f"{s3_bucket}/demo/build/bundle/")
    got = _s3_objects(f"{s3_bucket}/demo/build")
    assert _differences(expected, got) == []

    shards = _shards(local_build)
    table = {}
    for (name, a), (_, b) in zip(marks, marks[1:]):
        seg = CountingS3.calls[a:b]
        listings = sum(1 for m, _ in seg if m.startswith("list_objects"))
        markers = sum(1 for _, k in seg if _is_marker(k))
        table[name] = {"listings": listings, "markers": markers, "requests": len(seg), "shards": shards.get(name),
                       "methods": dict(Counter(m for m, _ in seg))}
    with capsys.disabled():
        print(f"\ndemo build: local {local_s:.0f} s, s3 {s3_s:.0f} s; S3 requests per stage:")
        for name, row in table.items():
            print(f"  {name:<14} {row}")
    for name, n in shards.items():
        row = table[name]
        assert row["listings"] + row["markers"] <= 3 * n, (name, row)

    # -- SIGKILL mid-build (twice), then a run to the end: the same objects --------------------------------------
    killed = f"{s3_bucket}/killed"
    storage.put_bytes(f"{killed}/demo_corpus/port", str(port).encode())  # the port the corpus is served on
    kills = []
    for frac in (0.35, 0.7):
        finished = _run_cli(killed, work, kill_after=max(5.0, s3_s * frac))
        in_progress = not storage.exists(f"{killed}/build/stats.json")
        kills.append({"fraction": frac, "killed": not finished, "build_unfinished": in_progress})
        if finished:
            break
    assert kills[0]["killed"] and kills[0]["build_unfinished"], kills
    _run_cli(killed, work)
    assert _differences(expected, _s3_objects(f"{killed}/build")) == []
    for name in ("query", "download", "persons", "faces", "clean"):  # no marker vouches for other bytes
        d = DatasetDir(f"{killed}/build/{name}")
        for sid in d.done_ids():
            d.read_shard(sid, verify=True)
    with capsys.disabled():
        print(f"  kills: {kills}")
