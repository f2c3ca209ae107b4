"""Output writers (pipeline/bundle/writers.py): the default WebDataset writer keeps the records' config hash,
and a writer registered from the tests folder (tests/toy_writer.py, ZIP shards) builds a bundle that verify,
report and remove handle through the writer's interface, with the same samples as the tar bundle."""

from __future__ import annotations

import json
import shutil
import zipfile

import pyarrow.parquet as pq
import pytest

from pipeline.bundle import run
from pipeline.bundle.pack import build_config_hash
from pipeline.bundle.remove import remove_subject
from pipeline.bundle.report import write_report
from pipeline.bundle.store import Store
from pipeline.bundle.verify import verify_bundle
from pipeline.bundle.writers import get_writer, register_writer, unregister_writer, writer_names
from pipeline.config import BuildConfig
from pipeline.stage import StageError
from tests.bundle_support import make_build, small_config

NAMES = {3: "Ada Subject"}


def zip_config(**bundle):
    cfg = small_config(writer="zip", **bundle)
    return cfg.model_copy(update={"plugins": ["tests.toy_writer"]})


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    inputs = make_build(root, names=NAMES)
    assert "zip" not in writer_names()  # only the config's plugins register it
    tar_stats = run(small_config(), inputs, root / "tar")
    zip_stats = run(zip_config(), inputs, root / "zip")
    yield root, inputs, tar_stats, zip_stats
    unregister_writer("zip")


def _members(stats: dict, folder, index: list[dict]) -> dict[tuple[str, str], bytes]:
    from pipeline.bundle.writers import writer_of

    writer, store = writer_of(stats), Store(str(folder))
    return {(r["key"], ext): writer.read_member(store, r, ext) for r in index for ext in ("jpg", "json", "face.npy")}


def test_toy_writer_builds_the_same_samples(builds):
    root, _, tar_stats, zip_stats = builds
    zips = sorted(p.name for p in (root / "zip").glob("webbody-*"))
    assert zips and all(n.endswith(".zip") for n in zips) and not list((root / "zip").glob("*.tar"))
    assert sorted(zip_stats["tars"]) == zips and zip_stats["writer"] == {"name": "zip", "module": "tests.toy_writer"}
    assert zip_stats["rows_out"] == tar_stats["rows_out"] == 48 and zip_stats["splits"] == tar_stats["splits"]
    tar_index = pq.read_table(root / "tar" / "index.parquet").to_pylist()
    zip_index = pq.read_table(root / "zip" / "index.parquet").to_pylist()
    same = ("key", "split", "position", "class_id", "identity", "role", "subsets", "person_id", "member_sha256",
            "npy_sha256")
    assert [{k: r[k] for k in same} for r in tar_index] == [{k: r[k] for k in same} for r in zip_index]
    # member bytes, read by each writer at the index's offsets, are the same rendered samples except the JSON
    # record's config_hash (the writer is part of the build's config)
    a, b = _members(tar_stats, root / "tar", tar_index), _members(zip_stats, root / "zip", zip_index)
    assert {k: v for k, v in a.items() if k[1] != "json"} == {k: v for k, v in b.items() if k[1] != "json"}
    for (key, ext), data in a.items():
        if ext == "json":
            ra, rb = json.loads(data), json.loads(b[(key, ext)])
            assert ra.pop("config_hash") != rb.pop("config_hash") and ra == rb
    # a plain unzip tool reads the shards
    with zipfile.ZipFile(root / "zip" / zips[0]) as zf:
        assert zf.testzip() is None and zf.namelist()[0].endswith(".jpg")
    assert verify_bundle(root / "zip") == []


def test_verify_catches_a_damaged_zip_member(builds, tmp_path):
    root = builds[0]
    out = tmp_path / "zip"
    shutil.copytree(root / "zip", out)
    row = pq.read_table(out / "index.parquet").to_pylist()[0]
    data = bytearray((out / row["shard"]).read_bytes())
    data[row["jpg_offset"] + 50] ^= 0xFF
    (out / row["shard"]).write_bytes(bytes(data))
    problems = [str(p) for p in verify_bundle(out)]
    assert any(row["shard"] in p and ("unreadable" in p or "sha256 mismatch" in p) for p in problems), problems


def test_remove_and_report_on_zip_shards(builds, tmp_path):
    root = builds[0]
    out = tmp_path / "zip"
    shutil.copytree(root / "zip", out)
    result = remove_subject(out, name="Ada Subject")
    assert result["samples"] == 6 and result["identities"] == 1
    assert verify_bundle(out) == []
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 42 and not any(r["name"] == "Ada Subject" for r in index)
    blob = b"".join(p.read_bytes() for p in out.iterdir() if p.is_file())
    assert b"Ada Subject" not in blob
    page = write_report(out).read_text()
    assert "data:image/jpeg;base64," in page and "Ada Subject" not in page


def test_default_writer_keeps_the_config_hash():
    base = BuildConfig()
    explicit = BuildConfig.model_validate({"bundle": {"writer": "webdataset"}})
    other = BuildConfig.model_validate({"bundle": {"writer": "zip"}})
    assert build_config_hash(base) == build_config_hash(explicit) != build_config_hash(other)
    # the hash of the default build config before writers were registered (records carry it)
    doc = base.model_dump(mode="json", exclude={"run"})
    del doc["plugins"], doc["extensions"], doc["bundle"]["writer"]
    from pipeline.stage import config_hash

    assert build_config_hash(base) == config_hash(doc)


def test_unknown_or_conflicting_writer_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="unknown output writer 'nope'"):
        get_writer("nope")
    with pytest.raises(StageError, match="unknown output writer"):
        run(small_config(writer="nope"), make_build(tmp_path, n_ids=2, per_id=2, n_shards=1), tmp_path / "b")
    from pipeline.bundle.tarpack import WebDatasetWriter

    with pytest.raises(StageError, match="already registered"):
        register_writer("webdataset")(type("Other", (WebDatasetWriter,), {"__module__": "elsewhere"}))
    with pytest.raises(StageError, match="built in"):
        unregister_writer("webdataset")


def test_toy_writer_on_ray_workers_gives_the_local_bytes(builds, tmp_path, ray_local):
    """Ray workers import the writer's module (named by the stage they run) and write the same ZIP shards."""
    _, inputs, _, _ = builds
    cfg = zip_config(pack_window=1)  # 3 windows -> 3 Ray tasks
    run(cfg, inputs, tmp_path / "local")
    ray_cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"executor": "ray"})})
    stats = run(ray_cfg, inputs, tmp_path / "ray")
    assert stats["run"]["units"] == 3
    names = sorted(p.name for p in (tmp_path / "local").iterdir() if p.suffix in (".zip", ".parquet"))
    assert any(n.endswith(".zip") for n in names)
    for n in names:
        assert (tmp_path / "ray" / n).read_bytes() == (tmp_path / "local" / n).read_bytes(), n
    assert verify_bundle(tmp_path / "ray") == []
