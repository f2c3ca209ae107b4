"""Bundle, training and evaluation over s3:// against a moto S3 server on 127.0.0.1 (the s3fs path users take).

The same inputs bundled to a local folder and to s3:// (inputs read from s3:// too) give byte-identical objects;
a resumed s3 bundle gives the same bytes again; training batches and evaluation results read from s3:// equal
the local ones; planning over s3 costs one listing per input stage and at most one marker read per shard;
`webbody remove` on an s3 bundle leaves what a local removal leaves.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle import run
from tests.bundle_support import make_build, small_config

BUCKET = f"bundle-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def s3(s3_server):
    """The harness's moto S3 server (tests/conftest.py: AWS_ENDPOINT_URL + dummy credentials for the session),
    a bucket of this module's, and the s3fs file system pipeline.storage uses."""
    from pipeline import storage
    from tests.servers import make_bucket

    storage.reset_filesystems()
    make_bucket(BUCKET)
    yield storage.filesystem("s3")
    storage.reset_filesystems()


@pytest.fixture(scope="module")
def builds(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3bundle")
    inputs = make_build(root)
    cfg = small_config(pack_window=2)  # 3 input shards -> 2 pack tasks
    run(cfg, inputs, root / "bundle")
    remote = {}
    for k, p in inputs.items():
        s3.put(str(p), f"{BUCKET}/build/{k}", recursive=True)
        remote[k] = f"s3://{BUCKET}/build/{k}"
    stats = run(cfg, remote, f"s3://{BUCKET}/build/bundle")
    return root, cfg, remote, stats


def _local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_objects(s3, local: Path, prefix: str) -> None:
    want = _local_files(local)
    got = {k[len(prefix) + 1:]: s3.cat_file(k) for k in s3.find(prefix)}
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        if name.endswith(".json") and name != "_stage.json":  # stats carry a wall time; everything else must match
            a, b = json.loads(data), json.loads(got[name])
            a.pop("seconds", None)
            b.pop("seconds", None)
            assert a == b, name
        else:
            assert got[name] == data, name


def test_bundle_on_s3_matches_local_bytes(s3, builds):
    root, _, _, stats = builds
    assert stats["rows_out"] == 48 and stats["complete"]
    _same_objects(s3, root / "bundle", f"{BUCKET}/build/bundle")
    assert not [k for k in s3.find(f"{BUCKET}/build/bundle") if k.endswith(".tmp")]


def test_s3_bundle_resumes_to_the_same_bytes(s3, builds, tmp_path):
    root, cfg, remote, _ = builds
    prefix = f"{BUCKET}/build/bundle"
    window = json.loads(s3.cat_file(f"{prefix}/part-00001.stats.json"))["tars"]
    shard = sorted(window)[0]
    s3.rm(f"{prefix}/part-00001.done")  # as if killed before the window's marker: its shards are redone
    s3.pipe(f"{prefix}/{shard}", b"garbage")
    s3.rm(f"{prefix}/index.parquet")
    run(cfg, remote, f"s3://{prefix}")
    _same_objects(s3, root / "bundle", prefix)
    other = small_config(pack_window=2, seed=7)
    from pipeline.stage import StageError

    with pytest.raises(StageError, match="overwrite"):
        run(other, remote, f"s3://{prefix}")


def test_planning_over_s3_is_one_listing_per_stage(s3, builds):
    from pipeline.bundle.plan import build_plan
    from pipeline.bundle.store import CountingFS, Store

    _, cfg, remote, _ = builds
    fs = CountingFS(s3)
    plan = build_plan(cfg.bundle, *(Store(remote[k], fs=fs) for k in ("clean", "persons", "faces")))
    assert len(plan.samples) == 48
    markers = sum(1 for _, p in fs.paths if p.endswith(".done"))
    assert fs.calls["ls"] == 3 and markers <= 3 * 3, fs.calls


def test_unknown_scheme_is_a_clear_error(tmp_path):
    from pipeline.bundle.store import Store
    from pipeline.stage import StageError

    with pytest.raises(StageError, match="unknown storage scheme"):
        Store("nosuchscheme://bucket/x")
    with pytest.raises(StageError, match="lost a slash"):
        Store(str(Path("s3://bucket/x")))


def test_training_reads_shards_from_s3(s3, builds):
    from sapiensid.data import BatchPlan, StreamLoader, StreamSpec, expand_urls

    root = builds[0]
    local = expand_urls(root / "bundle", split="train")
    remote = expand_urls(f"s3://{BUCKET}/build/bundle", split="train")
    assert [u.rsplit("/", 1)[1] for u in remote] == [Path(u).name for u in local]
    assert all(u.startswith("s3://") for u in remote)

    def first_batches(urls):
        spec = StreamSpec(urls=urls, image_size=64, plan=BatchPlan(batch_size=4), augment=None, shuffle_buffer=8)
        loader = StreamLoader(spec)
        return [next(loader) for _ in range(3)]

    for a, b in zip(first_batches(local), first_batches(remote)):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])


def test_evaluation_streams_from_s3(s3, builds):
    from sapiensid.config import SapiensIDConfig
    from sapiensid.data import expand_urls
    from sapiensid.evaluate import evaluate_webbody_shards
    from sapiensid.model import SapiensID

    torch.manual_seed(0)
    model = SapiensID(SapiensIDConfig.preset("tiny")).eval()
    dev = torch.device("cpu")
    local = evaluate_webbody_shards(model, expand_urls(builds[0] / "bundle", split="test"), dev, batch_size=8)
    remote = evaluate_webbody_shards(model, expand_urls(f"s3://{BUCKET}/build/bundle", split="test"), dev,
                                     batch_size=8)
    assert local["num_query_images"] == remote["num_query_images"] > 0
    for k in ("top1", "top5", "mAP"):
        assert np.isclose(local["general"][k], remote["general"][k]), k


def test_verify_and_report_on_s3(s3, builds):
    from pipeline.bundle.report import write_report
    from pipeline.bundle.verify import verify_bundle

    uri = f"s3://{BUCKET}/build/bundle"
    assert verify_bundle(uri) == []
    where = write_report(uri)
    assert where == f"{uri}/report.html"
    page = s3.cat_file(f"{BUCKET}/build/bundle/report.html")
    assert page.startswith(b"<!DOCTYPE html>") or b"<html" in page[:200]
    assert b"data:image/" in page  # gallery thumbnails came from ranged reads of the s3 shards
    s3.rm(f"{BUCKET}/build/bundle/report.html")
    s3.pipe(f"{BUCKET}/build/bundle/index.parquet", b"not parquet")
    assert any("index.parquet" in str(p) for p in verify_bundle(uri))


def test_remove_on_s3_matches_a_local_removal(s3, builds, tmp_path):
    """`webbody remove` on an s3:// bundle (through the same storage layer) leaves the objects a removal in a
    local copy leaves, and the bundle still verifies."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.bundle.remove import remove_subject
    from pipeline.bundle.verify import verify_bundle

    root = builds[0]
    local, prefix = tmp_path / "bundle", f"{BUCKET}/removed"
    shutil.copytree(root / "bundle", local)
    s3.put(str(local), prefix, recursive=True)
    _same_objects(s3, local, prefix)
    name = pq.read_table(local / "index.parquet").column("name").to_pylist()[0]
    a = remove_subject(local, name=name)
    b = remove_subject(f"s3://{prefix}", name=name)
    assert a == b and a["samples"] > 0
    _same_objects(s3, local, prefix)
    assert verify_bundle(f"s3://{prefix}") == []
    from flows.cli import main  # the command line, on the s3 bundle: remove (then verify), verify, report

    other = pq.read_table(local / "index.parquet").column("url").to_pylist()[0]
    assert main(["remove", f"s3://{prefix}", "--url", other]) == 0
    assert main(["verify", f"s3://{prefix}"]) == 0 and main(["report", f"s3://{prefix}"]) == 0
    assert main(["verify", f"s3://{BUCKET}/nothing-here"]) == 2
    assert name not in {r for r in pq.read_table(local / "index.parquet").column("name").to_pylist()}
