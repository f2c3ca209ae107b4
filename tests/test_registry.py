"""The stage registry: a user stage added from the test folder (tests/toy_stage.py) by naming its module in a
config's `plugins`, run in a build by the executor like any built-in stage, with its own validated section."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import registry
from pipeline.config import BuildConfig, EmbedderThresholds
from pipeline.stage import StageError


@pytest.fixture
def toy_registered():
    """The toy stage is registered by the test's config; forgotten afterwards (stage and module), so that
    other tests' builds see the built-in stages only."""
    yield
    registry.unregister_stage("url_hosts")
    sys.modules.pop("tests.toy_stage", None)


def _config(tmp_path, **extra) -> str:
    lst = tmp_path / "url.lst"
    if not lst.exists():  # once: the query stage's hash covers its input files
        lst.write_text("0 Ann http://www.Example.com/a.jpg\n1 Ann http://img.example.org/b.jpg\n"
                       "2 Bob https://WWW.example.net/c.png\n")
    raw = {"run": {"executor": "local"}, "plugins": ["tests.toy_stage"],
           "query": {"inputs": [{"path": str(tmp_path / "url.lst"), "format": "url_lst"}], "shard_size": 2},
           **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_user_stage_runs_in_a_build(tmp_path, toy_registered):
    from flows.build import build_plain

    out = tmp_path / "build"
    result = build_plain(_config(tmp_path, extensions={"url_hosts": {"strip_www": True}}), str(out), until="url_hosts")
    assert [s.name for s in registry.stages_until("url_hosts")] == ["query", "url_hosts"]
    hosts = sorted(r["host"] for f in sorted((out / "url_hosts").glob("*.parquet"))
                   for r in pq.read_table(f).to_pylist())
    assert hosts == ["example.com", "example.net", "img.example.org"]
    stats = json.loads((out / "url_hosts" / "stats.json").read_text())  # the executor's roll-up, not the stage's
    assert stats["complete"] and stats["shards"] == 2 and stats["rows_out"] == 3
    assert [s["stage"] for s in result["funnel"]["stages"]] == ["query", "url_hosts"]
    before = {p.name: p.read_bytes() for p in (out / "url_hosts").iterdir()}
    build_plain(_config(tmp_path, extensions={"url_hosts": {"strip_www": True}}), str(out), until="url_hosts")
    assert {p.name: p.read_bytes() for p in (out / "url_hosts").iterdir() if p.name != "stats.json"} == \
        {k: v for k, v in before.items() if k != "stats.json"}  # resumed: nothing redone
    with pytest.raises(StageError, match="another config|overwrite"):  # a changed section is a changed config
        build_plain(_config(tmp_path, extensions={"url_hosts": {"strip_www": False}}), str(out), until="url_hosts")


def test_registry_errors(tmp_path, toy_registered):
    from flows.build import build_plain

    with pytest.raises(StageError, match="extensions.url_hosts.strip_www"):
        build_plain(_config(tmp_path, extensions={"url_hosts": {"strip_www": "maybe"}}), str(tmp_path / "b1"),
                    until="url_hosts")
    with pytest.raises(StageError, match="extensions.nope: no registered stage"):
        build_plain(_config(tmp_path, extensions={"nope": {}}), str(tmp_path / "b2"), until="query")
    cfg = BuildConfig.model_validate({"plugins": ["tests.no_such_plugin"]})
    with pytest.raises(StageError, match="could not be imported"):
        registry.load_plugins(cfg)
    with pytest.raises(StageError, match="unknown stage 'thumbs'"):
        registry.get_stage("thumbs")
    with pytest.raises(StageError, match="already registered"):
        registry.register_stage("persons", "somewhere.else", ("download",))
    with pytest.raises(StageError, match="not registered stages before it"):
        registry.register_stage("late", "x.y", ("nothing",))
    with pytest.raises(StageError, match="built in"):
        registry.unregister_stage("clean")
    assert registry.stage_names()[:1] == ["query"] and "url_hosts" in registry.stage_names()


def test_user_embedder_runs_faces_and_clean_reads_its_thresholds(tmp_path):
    """A toy embedder registered from tests/toy_embedder.py through `plugins`: the faces stage builds it, writes
    its name and 64-d features, and clean takes the thresholds it registered with (no faces-module constant)."""
    from pipeline.clean.select import resolve_thresholds
    from pipeline.faces.embedders import EMBEDDERS
    from pipeline.shards import DatasetDir
    from tests.faces_support import load_rgb, person_row, write_persons

    rows = [person_row(p.split(".")[0], load_rgb(p, width=320), label="Ann")
            for p in ("obama.jpg", "obama2.jpg", "biden.jpg")]
    write_persons(tmp_path / "persons", [rows])
    cfg = BuildConfig.model_validate({
        "run": {"executor": "local"}, "plugins": ["tests.toy_embedder"],
        "faces": {"detector_model": "retinaface_mnet025.onnx", "embedder": "grey8", "batch_size": 4},
        "clean": {"min_images": 1}})
    assert "grey8" not in EMBEDDERS  # registered by the config's plugins only
    try:
        stats = registry.run_stage("faces", cfg, {"persons": tmp_path / "persons"}, tmp_path / "faces")
        assert stats["rows_out"] == 3
        table = pq.read_table(DatasetDir(tmp_path / "faces").parquet("00000"))
        assert set(table.column("embedder").to_pylist()) == {"grey8"}
        assert resolve_thresholds(cfg.clean, "grey8").merge == 0.995
        clean = registry.run_stage("clean", cfg, {"faces": tmp_path / "faces", "persons": tmp_path / "persons"},
                                   tmp_path / "clean")
        from tests import toy_embedder  # imported by the plugins list already: this only names it

        assert clean["rows_in"] == 3 and clean["complete"] and clean["embedder"] == "grey8"
        # From the entry, not from a faces constant; what the entry leaves out takes EmbedderThresholds' default.
        assert clean["thresholds"] == EmbedderThresholds.model_validate(toy_embedder.THRESHOLDS).model_dump()
        assert {k: clean["thresholds"][k] for k in toy_embedder.THRESHOLDS} == toy_embedder.THRESHOLDS
        # min_samples 1: three singleton clusters of three photos tie, so the name yields nothing (docs/clean.md)
        assert clean["drops"] == {"ambiguous_name": 3}
        with pytest.raises(StageError, match="already registered"):
            from pipeline.faces.embedders import register_embedder

            register_embedder("grey8", default_weights=None, thresholds={})(lambda *a: None)
        with pytest.raises(StageError, match="unknown face embedder 'nope'"):
            registry.run_stage("faces", cfg.model_copy(update={"faces": cfg.faces.model_copy(
                update={"embedder": "nope"})}), {"persons": tmp_path / "persons"}, tmp_path / "faces2")
    finally:
        EMBEDDERS.pop("grey8", None)
        sys.modules.pop("tests.toy_embedder", None)


def test_user_detector_runs_the_faces_stage(tmp_path):
    """A toy detector registered from tests/toy_detector.py through `plugins` (with the toy embedder): the
    faces stage builds it by name, and its boxes, landmarks and score are what the faces rows hold."""
    from pipeline.faces.detectors import DETECTORS
    from pipeline.shards import DatasetDir
    from tests.faces_support import load_rgb, person_row, write_persons

    rows = [person_row(p.split(".")[0], load_rgb(p, width=320), label="Ann") for p in ("obama.jpg", "biden.jpg")]
    write_persons(tmp_path / "persons", [rows])
    cfg = BuildConfig.model_validate({
        "run": {"executor": "local"}, "plugins": ["tests.toy_detector", "tests.toy_embedder"],
        "faces": {"detector": "centre", "detector_model": None, "embedder": "grey8", "batch_size": 4}})
    assert "centre" not in DETECTORS  # registered by the config's plugins only
    try:
        stats = registry.run_stage("faces", cfg, {"persons": tmp_path / "persons"}, tmp_path / "faces")
        assert stats["rows_out"] == 2 and stats["drops"] == {}
        table = pq.read_table(DatasetDir(tmp_path / "faces").parquet("00000")).to_pylist()
        assert {r["face_score"] for r in table} == {0.75}  # the toy's score, not a real detector's
        for r in table:  # a square box (to the canvas scale's rounding), the template's landmarks inside it
            x1, y1, x2, y2 = r["face_box"]
            assert abs((x2 - x1) - (y2 - y1)) < 0.02 * (x2 - x1) and x1 < r["face_landmarks"][0] < x2
        with pytest.raises(StageError, match="unknown face detector 'nope'"):
            registry.run_stage("faces", cfg.model_copy(update={"faces": cfg.faces.model_copy(
                update={"detector": "nope"})}), {"persons": tmp_path / "persons"}, tmp_path / "faces2")
        with pytest.raises(StageError, match="already registered"):
            from pipeline.faces.detectors import register_detector

            register_detector("centre", default_weights=None)(lambda *a: None)
    finally:
        DETECTORS.pop("centre", None)
        sys.modules.pop("tests.toy_detector", None)
        from pipeline.faces.embedders import EMBEDDERS

        EMBEDDERS.pop("grey8", None)
        sys.modules.pop("tests.toy_embedder", None)
