"""The partitioned clean (pipeline/clean/partition.py): per-name pass as one unit per faces shard on the
executors, and the cross-identity merge on gathered centers, against the single-process steps."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import clean
from pipeline.clean.cross import run_merge
from pipeline.clean.load import load_faces
from pipeline.clean.merge import merge_identities
from pipeline.clean.partition import NamesStage, merge_from_centers, name_groups, name_steps
from pipeline.clean.select import identity_strings, resolve_thresholds
from pipeline.clean.synthetic import FaceRows, at_cosine, people, photos, write_faces_dir
from pipeline.config import BuildConfig
from pipeline.executors import make_executor
from pipeline.shards import DatasetDir

DIM = 64


def build_rows(seed: int) -> FaceRows:
    """ann and anna are one person (a merge across shards), bob and bo look-alikes in the ambiguous band
    (cosine between `ambiguous` and `merge`), plus a stranger and a low face score."""
    rng = np.random.default_rng(seed)
    a, b, c, s1 = people(rng, 4, DIM)
    b2 = at_cosine(rng, b, 0.66)
    rows = FaceRows()
    groups = [("ann", a, 5), ("bob", b, 5), ("anna", a, 4), ("bo", b2, 3), ("cy", c, 3)]
    for label, person, n in groups:
        for i, f in enumerate(photos(rng, np.repeat(person[None], n, 0), 0.5)):
            rows.add(label, f"{label}{i}", f, label, face_score=0.5 if (label, i) == ("cy", 2) else 0.99)
    rows.add("ann", "annX", s1, "s1")
    return rows


def faces_dirs(tmp_path, rows: FaceRows):
    labels = np.asarray(rows.cols["source_label"])
    first = np.flatnonzero(np.isin(labels, ["ann", "bob"]))
    second = np.flatnonzero(~np.isin(labels, ["ann", "bob"]))
    aligned = write_faces_dir(tmp_path / "aligned", [rows.table(first), rows.table(second)])
    n = len(rows)
    split = write_faces_dir(tmp_path / "split", [rows.table(slice(0, n // 3)), rows.table(slice(n // 3, n))])
    return aligned, split


def single_process(faces: DatasetDir, cfg):
    loaded = load_faces(faces)
    thr = resolve_thresholds(cfg, loaded.embedder)
    name_steps(loaded.state, cfg, thr)
    before = dict(zip(loaded.meta.column("person_id").to_pylist(), identity_strings(loaded.state)))
    reasons_before = dict(zip(loaded.meta.column("person_id").to_pylist(), loaded.state.reason.tolist()))
    report = merge_identities(loaded.state, thr.merge, thr.ambiguous, cfg.block_size, cfg.center_weighting)
    after = dict(zip(loaded.meta.column("person_id").to_pylist(), identity_strings(loaded.state)))
    return before, reasons_before, after, report


def partitioned(faces: DatasetDir, out, cfg, executor):
    executor.run(NamesStage(cfg), {"faces": faces.uri}, str(out))
    d = DatasetDir(out)
    sel = {r["person_id"]: r for _, t in d.iter_tables() for r in t.to_pylist()}
    merged = DatasetDir(run_merge(executor, cfg, str(out), str(out) + "_merge", False)).read_json("merge.json")
    into, losers, report = merged["into"], set(merged["losers"]), merged["report"]
    # The distributed rounds decide what the one-process merge on all centres decides.
    ref_into, ref_losers, ref_report = merge_from_centers(d, cfg, "kprpe")
    assert (into, losers, report) == (ref_into, ref_losers, ref_report)
    after = {}
    for pid, r in sel.items():
        ident = into.get(r["identity"], r["identity"]) if r["identity"] is not None else None
        after[pid] = None if ident in losers else ident
    return sel, after, report


@pytest.mark.parametrize("layout", ["aligned", "split"])
def test_names_pass_and_center_merge_match_single_process(tmp_path, layout):
    cfg = BuildConfig().clean
    aligned, split = faces_dirs(tmp_path, build_rows(0))
    faces = aligned if layout == "aligned" else split
    assert name_groups(aligned) == [["00000"], ["00001"]]
    assert name_groups(split) == [["00000", "00001"]]
    before, reasons, after, report = single_process(faces, cfg)
    sel, got_after, got_report = partitioned(faces, tmp_path / f"names_{layout}", cfg, make_executor("local"))
    # Each verdict lands in the row's own shard.
    out = DatasetDir(tmp_path / f"names_{layout}")
    for sid in faces.done_ids():
        assert sorted(out.read_shard(sid).column("person_id").to_pylist()) == \
            sorted(faces.read_shard(sid).column("person_id").to_pylist())
    assert {p: r["identity"] for p, r in sel.items()} == before
    assert {p: r["reason"] for p, r in sel.items()} == reasons
    assert got_after == after
    assert got_report["identities_merged_away"] == report["identities_merged_away"] >= 1
    assert got_report["ambiguous_identities_dropped"] == report["ambiguous_identities_dropped"] >= 1
    assert after["bo0_0"] is None and after["bob0_0"] == "bob"  # the smaller of the ambiguous pair goes
    # anna merged into ann (more images); the stranger and the low face score are out before the merge.
    assert after["anna0_0"] == "ann" and reasons["annX_0"] == "dbscan_noise"
    assert reasons["cy2_0"] == "low_face_score"


def _selection_bytes(root) -> dict[str, bytes]:
    d = DatasetDir(root)
    return {sid: d.parquet(sid).read_bytes() for sid in d.done_ids()}


@pytest.mark.parametrize("layout", ["aligned", "split"])
def test_stage_equals_single_process_byte_for_byte(tmp_path, layout):
    aligned, split = faces_dirs(tmp_path, build_rows(2))
    faces = aligned if layout == "aligned" else split
    cfg = BuildConfig()
    ref = clean.run_single_process(cfg, {"faces": faces.root}, tmp_path / "single")
    got = clean.run(cfg, {"faces": faces.root}, tmp_path / "part", executor=make_executor("local"))
    assert _selection_bytes(tmp_path / "part") == _selection_bytes(tmp_path / "single")
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in ref["funnel"]]
    assert got["funnel"] == strip and got["steps"] == ref["steps"] and got["drops"] == ref["drops"]
    assert got["identities"] == ref["identities"] and got["images"] == ref["images"]


@pytest.mark.slow
def test_stage_on_ray_matches_local_byte_for_byte(tmp_path, ray_local):
    aligned, _ = faces_dirs(tmp_path, build_rows(1))
    cfg = BuildConfig()
    clean.run(cfg, {"faces": aligned.root}, tmp_path / "local", executor=make_executor("local"))
    clean.run(cfg, {"faces": aligned.root}, tmp_path / "ray", executor=make_executor("ray", task_cpus=0.5))
    assert _selection_bytes(tmp_path / "ray") == _selection_bytes(tmp_path / "local")
    assert list(_selection_bytes(tmp_path / "ray")) == ["00000", "00001"]
    for sub in ("_names", "_dedup"):
        for sid in ("00000", "00001"):
            name = f"{sub}/centers-{sid}.parquet"
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
