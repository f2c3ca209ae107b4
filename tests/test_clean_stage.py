"""The clean stage on synthetic faces directories: selection per input shard, funnel, determinism, resume,
validation overlap through center files, and the errors that must stop a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline import clean
from pipeline.clean.synthetic import FaceRows, people, photos, write_faces_dir
from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from pipeline.valsets import write_centers
from schemas.clean import CLEAN

DIM = 64


def build_rows(seed: int = 0) -> tuple[FaceRows, np.ndarray]:
    """Three names: 'ann' (5 photos + 2 strangers + a near-duplicate copy), 'bob' (4 photos, one
    low face score), 'cy' (a single photo). Returns the rows and the people's directions."""
    rng = np.random.default_rng(seed)
    ann, bob, cy, s1, s2 = people(rng, 5, DIM)
    rows = FaceRows()
    ann_photos = photos(rng, np.repeat(ann[None], 5, 0), 0.6)
    for i, f in enumerate(ann_photos):
        rows.add("ann", f"ann{i}", f, "ann")
    rows.add("ann", "annX", s1, "s1")
    rows.add("ann", "annY", s2, "s2")
    rows.add("ann", "ann0copy", photos(rng, ann_photos[:1], 0.01)[0], "ann", face_score=0.96)
    for i, f in enumerate(photos(rng, np.repeat(bob[None], 4, 0), 0.6)):
        rows.add("bob", f"bob{i}", f, "bob", face_score=0.5 if i == 3 else 0.99)
    rows.add("cy", "cy0", cy, "cy")
    return rows, np.stack([ann, bob, cy])


def faces_dir(root, rows: FaceRows):
    n = len(rows)
    # Two shards that split names across them: verdicts must still land in the row's own shard.
    return write_faces_dir(root, [rows.table(slice(0, n // 2)), rows.table(slice(n // 2, n))])


def read_selection(root) -> dict[str, dict]:
    d = DatasetDir(root)
    return {r["person_id"]: r for _, t in d.iter_tables() for r in t.to_pylist()}


def test_stage_selection_funnel_and_shards(tmp_path):
    rows, _ = build_rows()
    inp = faces_dir(tmp_path / "faces", rows)
    stats = clean.run(BuildConfig(), {"faces": inp.root}, tmp_path / "clean")
    out = DatasetDir(tmp_path / "clean")
    assert out.done_ids() == inp.done_ids() == ["00000", "00001"]
    for sid in out.done_ids():
        got = CLEAN.validate(out.read_shard(sid))
        assert sorted(got.column("person_id").to_pylist()) == sorted(inp.read_shard(sid).column("person_id").to_pylist())
    sel = read_selection(tmp_path / "clean")
    kept = {pid: r["identity"] for pid, r in sel.items() if r["kept"]}
    assert kept == {**{f"ann{i}_0": "ann" for i in range(5)},
                    **{f"bob{i}_0": "bob" for i in range(3)}}
    reasons = {pid: r["reason"] for pid, r in sel.items() if not r["kept"]}
    # The copy has the lower face score, so it is the one dropped.
    assert reasons == {"annX_0": "dbscan_noise", "annY_0": "dbscan_noise", "ann0copy_0": "near_duplicate",
                       "bob3_0": "low_face_score", "cy0_0": "dbscan_noise"}
    assert stats["identities"] == 2 and stats["images"] == 8 and stats["rows_in"] == len(rows)
    assert stats["drops"] == {"dbscan_noise": 3, "low_face_score": 1, "near_duplicate": 1}
    assert [f["step"] for f in stats["funnel"]] == ["input", "copies", "cluster", "face_score", "merge", "near_duplicates",
                                                    "val_overlap", "min_images"]
    assert json.loads((tmp_path / "clean" / "stats.json").read_text()) == stats
    assert stats["embedder"] == "kprpe"


def test_stage_is_deterministic_and_resumes(tmp_path):
    rows, _ = build_rows(1)
    inp = faces_dir(tmp_path / "faces", rows)
    cfg = BuildConfig()
    clean.run(cfg, {"faces": inp.root}, tmp_path / "a")
    clean.run(cfg, {"faces": inp.root}, tmp_path / "b")
    a, b = DatasetDir(tmp_path / "a"), DatasetDir(tmp_path / "b")
    for sid in a.done_ids():
        assert a.parquet(sid).read_bytes() == b.parquet(sid).read_bytes()
    before = a.parquet("00001").read_bytes()
    mtime = a.parquet("00000").stat().st_mtime_ns
    # A run killed before its last marker and roll-up: only that shard is written again, identically.
    a.marker("00001").unlink()
    (tmp_path / "a" / "stats.json").unlink()
    clean.run(cfg, {"faces": inp.root}, tmp_path / "a")
    assert a.parquet("00001").read_bytes() == before and a.parquet("00000").stat().st_mtime_ns == mtime
    # Finished and unchanged: skipped.
    again = clean.run(cfg, {"faces": inp.root}, tmp_path / "a")
    assert again == json.loads((tmp_path / "a" / "stats.json").read_text())
    assert a.parquet("00000").stat().st_mtime_ns == mtime
    # Another config must not mix with this selection.
    other = BuildConfig.model_validate({"clean": {"face_score": 0.4}})
    with pytest.raises(StageError, match="overwrite"):
        clean.run(other, {"faces": inp.root}, tmp_path / "a")
    stats = clean.run(other, {"faces": inp.root}, tmp_path / "a", overwrite=True)
    assert stats["drops"].get("low_face_score", 0) == 0


def test_val_overlap_through_center_files_and_embedder_mismatch(tmp_path):
    rows, truth = build_rows(2)
    inp = faces_dir(tmp_path / "faces", rows)
    rng = np.random.default_rng(5)
    # One validation image of bob (a .bin-style center: one image, one center) among strangers.
    lfw = tmp_path / "lfw.parquet"
    feats = np.concatenate([photos(rng, truth[1:2], 0.4), people(rng, 20, DIM)])
    write_centers(lfw, "lfw", "kprpe", "{}", [f"img{i}" for i in range(21)], feats, [1] * 21)
    calfw = tmp_path / "calfw.parquet"
    write_centers(calfw, "calfw", "kprpe", "{}", ["x"], people(rng, 1, DIM), [3])
    cfg = BuildConfig.model_validate({"clean": {"valsets": [str(lfw), str(calfw)]}})
    stats = clean.run(cfg, {"faces": inp.root}, tmp_path / "clean")
    sel = read_selection(tmp_path / "clean")
    assert {sel[f"bob{i}_0"]["reason"] for i in range(3)} == {"val_overlap:lfw"}
    assert sel["ann1_0"]["kept"]
    assert stats["steps"]["val_overlap"]["lfw"]["identities"] == 1
    assert stats["steps"]["val_overlap"]["lfw"]["images"] == 3
    assert stats["steps"]["val_overlap"]["calfw"]["identities"] == 0
    assert stats["identities"] == 1

    dlib = tmp_path / "lfw_dlib.parquet"
    write_centers(dlib, "lfw", "dlib", "{}", ["img0"], people(rng, 1, DIM), [1])
    bad = BuildConfig.model_validate({"clean": {"valsets": [str(dlib)]}})
    with pytest.raises(StageError, match="built with embedder 'dlib'.*from 'kprpe'"):
        clean.run(bad, {"faces": inp.root}, tmp_path / "clean2")


def test_bad_rows_and_bad_inputs(tmp_path):
    rows, _ = build_rows(3)
    rows.cols["feature"][1] = rows.cols["feature"][1][:-2]  # truncated feature: one value short
    rows.cols["feature"][2] = np.full(DIM, np.nan, "<f2").tobytes()
    inp = faces_dir(tmp_path / "faces", rows)
    stats = clean.run(BuildConfig(), {"faces": inp.root}, tmp_path / "clean")
    sel = read_selection(tmp_path / "clean")
    assert sel["ann1_0"]["reason"] == sel["ann2_0"]["reason"] == "bad_feature"
    assert stats["drops"]["bad_feature"] == 2

    # Mixed embedders: refused.
    mixed, _ = build_rows(4)
    mixed.cols["embedder"][0] = "dlib"
    inp2 = faces_dir(tmp_path / "mixed", mixed)
    with pytest.raises(StageError, match="mixes embedders"):
        clean.run(BuildConfig(), {"faces": inp2.root}, tmp_path / "c2")

    # Unfinished faces stage (no roll-up): refused, clean is global.
    shutil.copytree(inp.root, tmp_path / "partial")
    (tmp_path / "partial" / "stats.json").unlink()
    with pytest.raises(StageError, match="faces stage has not finished"):
        clean.run(BuildConfig(), {"faces": tmp_path / "partial"}, tmp_path / "c3")

    # A missing center file: refused with what to do.
    cfg = BuildConfig.model_validate({"clean": {"valsets": [str(tmp_path / "nope.parquet")]}})
    with pytest.raises(StageError, match="webbody valsets build"):
        clean.run(cfg, {"faces": inp.root}, tmp_path / "c4")


def test_thresholds_come_from_config_then_embedder_defaults():
    from pipeline.clean.select import resolve_thresholds
    from pipeline.faces.embedders import embedder_entry

    cfg = BuildConfig.model_validate({"clean": {"thresholds": {"kprpe": {"merge": 0.8}}}}).clean
    assert resolve_thresholds(cfg, "kprpe").merge == 0.8
    assert resolve_thresholds(cfg, "dlib").merge == embedder_entry("dlib").thresholds["merge"]
    with pytest.raises(ValueError, match="ambiguous"):
        BuildConfig.model_validate({"clean": {"thresholds": {"kprpe": {"merge": 0.5}}}})
