"""The bundle stage: shard layout, record contents, determinism, resume, splits."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.bundle import run
from pipeline.bundle.splits import is_hard, make_splits
from pipeline.bundle.verify import verify_bundle
from pipeline.config import BundleConfig
from pipeline.geometry import letterbox_geometry
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from schemas.sample import validate_sample
from tests.bundle_support import make_build, small_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    inputs = make_build(root)
    stats = run(small_config(), inputs, root / "bundle")
    return root, inputs, stats


def _index(root):
    return pq.read_table(root / "bundle" / "index.parquet").to_pylist()


def test_layout_counts_and_verify(built):
    root, _, stats = built
    out = root / "bundle"
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == sorted(stats["tars"]) and stats["shards"] == stats["shards_done"] == 1  # one window
    assert all(re.fullmatch(r"webbody-(train|test)-\d{6}\.tar", t) for t in tars)
    # 8 identities x 6 kept images; the 3 clean-dropped rows never reach the bundle
    assert stats["rows_in"] == stats["rows_out"] == 48
    assert stats["splits"]["test"]["identities"] == 2 and stats["splits"]["train"]["identities"] == 6
    assert max(s["samples"] for s in stats["tars"].values()) <= 10
    assert verify_bundle(out) == []


def test_members_contiguous_and_index_offsets(built):
    root, _, _ = built
    out = root / "bundle"
    rows = {r["key"]: r for r in _index(root)}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            names = [m.name for m in tf.getmembers()]
            for m in tf.getmembers():
                assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.mode == 0o444
        keys = [n.split(".", 1)[0] for n in names]
        groups = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(groups) == len(set(groups)), "a sample's members must be contiguous"
        assert {n.split(".", 1)[1] for n in names} == {"jpg", "json", "face.npy"}
        blob = tar.read_bytes()
        for k in groups:
            r = rows[k]
            jpg = blob[r["jpg_offset"]: r["jpg_offset"] + r["jpg_size"]]
            assert jpg[:2] == b"\xff\xd8"
            meta = json.loads(blob[r["json_offset"]: r["json_offset"] + r["json_size"]])
            assert meta["key"] == k and meta["class_id"] == r["class_id"] and meta["split"] == r["split"]


def test_record_geometry_matches_source(built):
    root, inputs, _ = built
    persons = {r["person_id"]: r for _, t in DatasetDir(inputs["persons"]).iter_tables() for r in t.to_pylist()}
    faces = {r["person_id"]: r for _, t in DatasetDir(inputs["faces"]).iter_tables() for r in t.to_pylist()}
    out = root / "bundle"
    r = _index(root)[0]
    blob = (out / r["shard"]).read_bytes()
    meta = validate_sample(json.loads(blob[r["json_offset"]: r["json_offset"] + r["json_size"]]))
    img = cv2.imdecode(np.frombuffer(blob[r["jpg_offset"]: r["jpg_offset"] + r["jpg_size"]], np.uint8), 1)
    assert img.shape == (384, 384, 3)
    p, f = persons[r["person_id"]], faces[r["person_id"]]
    geo = letterbox_geometry(p["crop_width"], p["crop_height"], 384)
    left, top = int(geo.offset_x), int(geo.offset_y)
    assert meta["content_box"] == [left, top, left + geo.new_w, top + geo.new_h]
    # long side 384, centred, white padding
    assert max(geo.new_w, geo.new_h) == 384 and abs((384 - geo.new_w) - 2 * left) <= 1
    if left > 2:
        assert img[:, : left - 1].min() >= 250
    for i in range(17):
        x, y, c = p["keypoints_crop"][3 * i: 3 * i + 3]
        assert meta["keypoints"][i][0] == pytest.approx(x * geo.scale_x + left, abs=1e-3)
        assert meta["keypoints"][i][1] == pytest.approx(y * geo.scale_x + top, abs=1e-3)
        assert meta["keypoints"][i][2] == pytest.approx(c, abs=1e-3)
    assert meta["face_box"][0] == pytest.approx(f["face_box"][0] * geo.scale_x + left, abs=1e-3)
    assert meta["face_landmarks"][2][1] == pytest.approx(f["face_landmarks"][5] * geo.scale_x + top, abs=1e-3)
    assert meta["url"] == p["url"] and meta["image_sha256"] == p["image_sha256"]
    assert meta["body_box"] == pytest.approx(list(p["box"]))
    assert meta["pipeline_version"] and len(meta["config_hash"]) == 16
    npy = np.load(io.BytesIO(blob[r["npy_offset"]: r["npy_offset"] + r["npy_size"]]))
    assert npy.dtype == np.float16 and np.array_equal(npy, np.frombuffer(f["feature"], "<f2"))


def test_deterministic_bytes_and_resume(built, tmp_path):
    root, inputs, _ = built
    other = tmp_path / "again"
    run(small_config(), inputs, other)
    for name in ["index.parquet", "centers.parquet", *sorted(p.name for p in (root / "bundle").glob("*.tar"))]:
        assert (other / name).read_bytes() == (root / "bundle" / name).read_bytes(), name
    # One pack task per input shard: a window killed before its marker is redone (all its shards), the other
    # windows are kept as they are.
    cfg = small_config(pack_window=1)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(cfg, inputs, ref)
    run(cfg, inputs, out)
    windows = {sid: json.loads((out / f"part-{sid}.stats.json").read_text())["tars"] for sid in ("00000", "00001")}
    victim = out / sorted(windows["00001"])[0]
    keep = out / sorted(windows["00000"])[0]
    before = keep.stat().st_mtime_ns
    (out / "part-00001.done").unlink()
    victim.write_bytes(b"half a shard")
    (out / "index.parquet").unlink()
    run(cfg, inputs, out)
    assert victim.read_bytes() == (ref / victim.name).read_bytes()
    assert keep.stat().st_mtime_ns == before
    for name in ["index.parquet", "centers.parquet", *sorted(p.name for p in ref.glob("*.tar"))]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert verify_bundle(out) == []


def test_bundle_shards_mix_input_shards(built):
    """Samples are shuffled across the input shards of a window (here all 3), not packed shard by shard."""
    root, inputs, _ = built
    in_shard = {r["person_id"]: sid for sid, t in DatasetDir(inputs["clean"]).iter_tables(["person_id"])
                for r in t.to_pylist()}
    per_shard = defaultdict(set)
    for r in _index(root):
        per_shard[r["shard"]].add(in_shard[r["person_id"]])
    train = [v for k, v in per_shard.items() if "train" in k]
    assert all(len(v) >= 2 for v in train), per_shard


def _rewrite_with_row_groups(src: Path, dst: Path, rows_per_group: int) -> None:
    """Copy a stage folder, rewriting each shard with small row groups (and a marker that matches)."""
    from pipeline.shards import file_sha256

    shutil.copytree(src, dst)
    d = DatasetDir(dst)
    for sid in d.shard_ids():
        pq.write_table(pq.read_table(d.parquet(sid)), d.parquet(sid), row_group_size=rows_per_group,
                       compression="zstd")
        assert pq.ParquetFile(d.parquet(sid)).num_row_groups > 1
        marker = json.loads(d.marker(sid).read_text())
        marker.update(bytes=d.parquet(sid).stat().st_size, sha256=file_sha256(d.parquet(sid)))
        d.marker(sid).write_text(json.dumps(marker))


def test_row_groups_and_ray_tasks_give_the_same_bytes(built, tmp_path, ray_local):
    """Pack tasks read persons/faces one row group at a time; on Ray (one task per window) the bytes are those of
    the local run over single-row-group shards."""
    _, inputs, _ = built
    cfg = small_config(pack_window=1)  # 3 windows -> 3 Ray tasks
    run(cfg, inputs, tmp_path / "local")
    grouped = dict(inputs)
    for k in ("persons", "faces"):
        grouped[k] = tmp_path / "in" / k
        _rewrite_with_row_groups(inputs[k], grouped[k], rows_per_group=4)
    ray_cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": "ray"})})
    stats = run(ray_cfg, grouped, tmp_path / "ray")
    assert len(stats["tars"]) >= 3 and stats["shards"] == 3 and stats["run"]["units"] == 3
    for p in sorted((tmp_path / "local").rglob("*")):
        if p.is_file() and p.suffix in (".tar", ".parquet"):
            assert (tmp_path / "ray" / p.relative_to(tmp_path / "local")).read_bytes() == p.read_bytes(), p.name
    assert verify_bundle(tmp_path / "ray") == []


def test_other_config_is_refused(built, tmp_path):
    _, inputs, _ = built
    run(small_config(), inputs, tmp_path / "b")
    with pytest.raises(StageError, match="overwrite"):
        run(small_config(jpeg_quality=80), inputs, tmp_path / "b")
    before = {p.name for p in (tmp_path / "b").glob("*.tar")}
    # fewer, bigger shards: the earlier run's shards are discarded with it (no stray tar is left behind)
    run(small_config(jpeg_quality=80, samples_per_shard=20), inputs, tmp_path / "b", overwrite=True)
    assert len({p.name for p in (tmp_path / "b").glob("*.tar")}) < len(before)
    assert verify_bundle(tmp_path / "b") == []


def test_splits_disjoint_labels_contiguous(built):
    root, _, stats = built
    rows = _index(root)
    ids = defaultdict(set)
    for r in rows:
        ids[r["split"]].add(r["identity"])
    assert ids["train"].isdisjoint(ids["test"]) and len(ids["test"]) == 2
    for split in ("train", "test"):
        labels = {r["identity"]: r["class_id"] for r in rows if r["split"] == split}
        assert sorted(labels.values()) == list(range(len(labels)))
    roles = defaultdict(set)
    for r in rows:
        if r["split"] == "test":
            roles[r["identity"]].add(r["role"])
        else:
            assert r["role"] == "train"
    assert all(v == {"query", "gallery"} for v in roles.values())
    assert stats["split_plan"]["queries"] == sum(r["role"] == "query" for r in rows)


def _synthetic(n_ids: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    idents, keys, hard = [], [], []
    for i in range(n_ids):
        n = int(rng.integers(20, 160))
        n_hard = int(rng.integers(0, n + 1))
        for j in range(n):
            idents.append(f"id{i:05d}")
            keys.append(f"k{i:05d}_{j:04d}")
            hard.append(j < n_hard)
    return idents, keys, hard


def test_official_split_rule_reproducible_and_disjoint():
    idents, keys, hard = _synthetic(400)
    a = make_splits(idents, keys, hard, BundleConfig(test_identities=30, seed=42))
    b = make_splits(idents, keys, hard, BundleConfig(test_identities=30, seed=42))
    c = make_splits(idents, keys, hard, BundleConfig(test_identities=30, seed=7))
    assert a.split_of == b.split_of and a.role_of == b.role_of and a.subsets_of == b.subsets_of
    assert a.split_of != c.split_of
    test = {i for i, s in a.split_of.items() if s == "test"}
    assert len(test) == 30
    counts, hards = defaultdict(int), defaultdict(int)
    for i, h in zip(idents, hard):
        counts[i] += 1
        hards[i] += h
    for i in test:  # the official eligibility: 30 < #hard < 70 and 30 < #images < 150
        assert 30 < hards[i] < 70 and 30 < counts[i] < 150
    for k, role in a.role_of.items():
        assert a.split_of[idents[keys.index(k)]] == "test"
        if role == "query":
            assert hard[keys.index(k)]
    # train subsets: frequent = top 48 % by count; 12m / 4m from it, 4m_random from all training ids
    train = [i for i, s in a.split_of.items() if s == "train"]
    freq = set(sorted(train, key=lambda i: (-counts[i], i))[: int(0.48 * len(train))])
    in12 = {i for i in train if "12m" in a.subsets_of[i]}
    in4 = {i for i in train if "4m" in a.subsets_of[i]}
    assert in12 <= freq and in4 <= freq and len(in12) == int(0.7 * len(freq)) and len(in4) == int(0.25 * len(freq))
    assert sum("4m_random" in a.subsets_of[i] for i in train) == int(0.23 * len(train))
    assert all(a.subsets_of.get(i) is None for i in test)


def test_split_shortfall_is_reported():
    idents, keys, hard = _synthetic(50)
    plan = make_splits(idents, keys, hard, BundleConfig(test_identities=4000, seed=42))
    assert plan.stats["identities"]["test"] == plan.stats["test_identities_eligible"] < 4000
    assert plan.stats["test_identities_short"] == 4000 - plan.stats["test_identities_eligible"]


def test_hard_rule():
    conf = [0.9] * 17
    assert not is_hard(conf)  # whole face visible
    conf[3] = 0.1
    assert is_hard(conf)  # partial face, lower body visible
    conf[10:17] = [0.1] * 7
    assert not is_hard(conf)  # lower body hidden


def test_fast_writer_bytes_equal_tarfile():
    """The hand-filled USTAR headers give exactly the bytes tarfile writes for the same members."""
    import os

    from pipeline.bundle.tarpack import TAR_FORMAT, ShardWriter, _info

    rng = np.random.default_rng(0)
    samples = [(f"k{i:06d}_{i % 3}", [("jpg", os.urandom(int(rng.integers(1, 5000)))), ("json", os.urandom(i)),
                                       ("face.npy", os.urandom(384))]) for i in range(200)]
    ours = io.BytesIO()
    w = ShardWriter(ours)
    offsets = [w.add(k, ms) for k, ms in samples]
    w.close()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=TAR_FORMAT) as tf:
        for k, ms in samples:
            for ext, data in ms:
                tf.addfile(_info(f"{k}.{ext}", len(data)), io.BytesIO(data))
    assert ours.getvalue() == ref.getvalue()
    blob = ours.getvalue()
    for (_, ms), members in zip(samples, offsets):
        for (_, data), m in zip(ms, members):
            assert blob[m.data_offset: m.data_offset + m.size] == data


def test_unit_payload_grows_with_identities_not_samples(tmp_path):
    """A pack task's payload lists the window's identities (split, label, subsets), not its samples: 4x the
    images per identity leave it the same size (no test split here, whose queries are listed by key)."""
    from pipeline.bundle.stage import BundleStage
    from pipeline.stage import PlanContext

    sizes = []
    for per_id in (4, 16):
        inputs = make_build(tmp_path / f"b{per_id}", n_ids=6, per_id=per_id, dropped=0)
        cfg = small_config(test_identities=0)
        ctx = PlanContext(inputs={k: DatasetDir(v) for k, v in inputs.items()}, output=DatasetDir(tmp_path / "o"))
        (unit,) = BundleStage(cfg).plan(ctx)
        text = json.dumps(unit.payload, sort_keys=True)
        assert "_0" not in text and "_1" not in text  # no sample key / person id (they end in _<detection>)
        sizes.append(len(text))
    assert abs(sizes[1] - sizes[0]) <= 8, sizes
