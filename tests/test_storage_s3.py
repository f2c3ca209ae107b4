"""Storage and the stage contract on S3: a moto server on 127.0.0.1 reached through s3fs exactly as a user's
S3 (AWS_ENDPOINT_URL + credentials from the environment). Round trips, marker-last commits, a killed commit,
credentials never written or logged, requests per stage counted with a wrapped file system, and executors
on S3 byte-identical to local."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import s3fs

from pipeline import storage
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.query import build_manifest
from pipeline.shards import DatasetDir
from tests.faults import AddOffset, SlowSquare, make_toy_input, run_or_kill

pytestmark = pytest.mark.integration


class CountingS3(s3fs.S3FileSystem):
    """s3fs with every S3 API call recorded as (method, key or prefix): one entry per HTTP request."""

    calls: list[tuple[str, str]] = []

    async def _call_s3(self, method, *akwarglist, **kwargs):
        CountingS3.calls.append((method, str(kwargs.get("Key") or kwargs.get("Prefix") or "")))
        return await super()._call_s3(method, *akwarglist, **kwargs)


@pytest.fixture
def counting(s3_bucket):
    CountingS3.calls = []
    storage.register_scheme("s3", lambda: CountingS3(use_listings_cache=False, skip_instance_cache=True))
    yield CountingS3.calls
    storage.register_scheme("s3", storage._s3)


def _objects(uri: str) -> dict[str, bytes]:
    fs, path = storage.resolve(uri)
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)}


def _local_objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """Everything but per-shard and roll-up stats (they hold wall-clock seconds)."""
    return {k: v for k, v in files.items() if not k.endswith("stats.json")}


def test_round_trip_and_listing(s3_bucket):
    root = storage.join(s3_bucket, "a", "b")
    storage.put_bytes(storage.join(root, "x.bin"), b"abc")
    with storage.open_write(storage.join(root, "y.tar")) as fh:
        fh.write(b"t" * 10_000)
    t = pa.table({"k": list(range(100))})
    storage.write_parquet(storage.join(root, "t.parquet"), t)
    assert storage.read_parquet(storage.join(root, "t.parquet"), columns=["k"]).equals(t)
    with storage.open_read(storage.join(root, "y.tar")) as fh:
        fh.seek(9_998)
        assert fh.read() == b"tt"
    listing = storage.list_dir(root)
    assert listing["x.bin"] == 3 and listing["y.tar"] == 10_000 and set(listing) == {"x.bin", "y.tar", "t.parquet"}
    assert storage.list_dir(storage.join(s3_bucket, "nothing")) == {}
    with pytest.raises(storage.StorageError, match="not found"):
        storage.get_bytes(storage.join(root, "missing"))


def test_commit_is_marker_last_and_a_killed_commit_leaves_no_marker(counting, s3_bucket):
    d = DatasetDir(storage.join(s3_bucket, "stage"))
    d.commit_shard("00000", pa.table({"sample_id": ["a"]}), {"rows_in": 1})
    puts = [k.rsplit("/", 1)[1] for m, k in counting if m == "put_object"]
    assert puts == ["part-00000.parquet", "part-00000.stats.json", "part-00000.done"]

    class Killed(Exception):
        pass

    real = storage.put_bytes

    def dies_at_stats(uri, data):
        if str(uri).endswith(".stats.json"):
            raise Killed
        real(uri, data)

    storage.put_bytes = dies_at_stats
    try:
        with pytest.raises(Killed):
            d.commit_shard("00001", pa.table({"sample_id": ["b"]}), {})
    finally:
        storage.put_bytes = real
    fresh = DatasetDir(d.uri)
    assert fresh.done_ids() == ["00000"] and "part-00001.parquet" in fresh.listing()


def test_requests_per_stage_and_s3_equals_local(counting, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    n = 6
    make_toy_input(tmp_path / "in", n_shards=n, rows=10)
    s3_in = storage.join(s3_bucket, "build", "in")
    make_toy_input(s3_in, n_shards=n, rows=10)
    for name in ("square", "offset"):
        local_out = tmp_path / name
        stage = SlowSquare(delay=0.0) if name == "square" else AddOffset(offset=3)
        src_local = tmp_path / "in" if name == "square" else tmp_path / "square"
        src_s3 = s3_in if name == "square" else storage.join(s3_bucket, "build", "square")
        LocalExecutor().run(stage, src_local, local_out)
        counting.clear()
        LocalExecutor().run(stage, src_s3, storage.join(s3_bucket, "build", name))
        listings = sum(1 for m, _ in counting if m.startswith("list_objects"))
        markers = sum(1 for m, k in counting if k.endswith(".done"))
        assert listings + markers <= 3 * n, Counter(m for m, _ in counting)
        assert _comparable(_objects(storage.join(s3_bucket, "build", name))) == _comparable(_local_objects(local_out))
        # a re-run finds everything done with listings only: no marker request at all
        counting.clear()
        again = LocalExecutor().run(stage, src_s3, storage.join(s3_bucket, "build", name))
        assert again.processed == [] and not [k for _, k in counting if k.endswith(".done")]
    # credentials never reach an object or a log line
    secret, key = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    for blob in _objects(storage.join(s3_bucket, "build")).values():
        assert secret.encode() not in blob and key.encode() not in blob
    assert secret not in caplog.text and key not in caplog.text


def test_query_writes_its_manifest_to_s3(s3_bucket, tmp_path):
    lst = tmp_path / "url.lst"
    lst.write_text("".join(f"{i} L{i % 3} http://a.example/{i}.jpg\n" for i in range(12)))
    from pipeline.config import QueryConfig

    cfg = QueryConfig(inputs=[{"path": str(lst)}], shard_size=4)
    local = build_manifest(cfg, tmp_path / "m")
    remote = build_manifest(cfg, storage.join(s3_bucket, "m"))
    keys = ("rows_in", "rows_out", "drops", "identities")
    assert {k: local[k] for k in keys} == {k: remote[k] for k in keys}
    assert _comparable(_objects(storage.join(s3_bucket, "m"))) == _comparable(_local_objects(tmp_path / "m"))
    # inputs on S3 too: a prefix holding the list (and a list of opted-out names)
    storage.put_bytes(storage.join(s3_bucket, "urls", "url.lst"), lst.read_bytes())
    storage.put_bytes(storage.join(s3_bucket, "optout.txt"), b"L1\n")
    cfg_s3 = QueryConfig(inputs=[{"path": storage.join(s3_bucket, "urls")}], shard_size=4,
                         optout_names=storage.join(s3_bucket, "optout.txt"))
    from_s3 = build_manifest(cfg_s3, storage.join(s3_bucket, "m2"))
    assert from_s3["drops"] == {"optout_name": 4} and from_s3["rows_out"] == 8


@pytest.mark.slow
def test_ray_executor_on_s3_equals_local(s3_bucket, tmp_path, ray_local):
    make_toy_input(tmp_path / "in", n_shards=4, rows=12)
    s3_in = storage.join(s3_bucket, "in")
    make_toy_input(s3_in, n_shards=4, rows=12)
    LocalExecutor().run(SlowSquare(delay=0.0), tmp_path / "in", tmp_path / "sq")
    LocalExecutor().run(AddOffset(), tmp_path / "sq", tmp_path / "off")
    ex = RayExecutor(num_actors=1, actor_cpus=0.5)
    ex.run(SlowSquare(delay=0.0), s3_in, storage.join(s3_bucket, "sq"))  # actor pool, workers commit to S3
    ex.run(AddOffset(), storage.join(s3_bucket, "sq"), storage.join(s3_bucket, "off"))  # one task per shard
    for name in ("sq", "off"):
        assert _comparable(_objects(storage.join(s3_bucket, name))) == _comparable(_local_objects(tmp_path / name))


_KILL_TARGET = """
import sys, time
from pipeline.runtime import ensure_offline_env
ensure_offline_env()
from pipeline.executors import LocalExecutor
from tests.faults import SlowSquare, AddOffset, make_toy_input
from pipeline.shards import DatasetDir
root = sys.argv[1]
inp = DatasetDir(root + "/in")
if not inp.has("stats.json"):
    make_toy_input(root + "/in", n_shards=8, rows=12)
    inp.write_json("stats.json", {"complete": True})
LocalExecutor().run(SlowSquare(delay=0.03), root + "/in", root + "/square")
LocalExecutor().run(AddOffset(offset=2, delay=0.01), root + "/square", root + "/offset")
print("DONE")
"""


def _run_target(root: str, kill_after: float | None = None) -> bool:
    import sys

    return run_or_kill([sys.executable, "-c", _KILL_TARGET, root], kill_after, 600,
                       cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.slow
def test_sigkill_mid_build_on_s3_then_rerun_gives_the_same_bytes(s3_bucket):
    import random

    ref, killed = storage.join(s3_bucket, "ref"), storage.join(s3_bucket, "killed")
    t0 = __import__("time").perf_counter()
    _run_target(ref)
    build_seconds = __import__("time").perf_counter() - t0
    rng = random.Random(7)
    kills = 0
    for frac in (0.35, 0.55, 0.75, 0.9):
        if _run_target(killed, kill_after=build_seconds * frac + rng.uniform(0, 0.3)):
            break
        kills += 1
    _run_target(killed)
    assert kills >= 2, "every kill landed after the build had finished: the test proves nothing"
    assert _comparable(_objects(killed)) == _comparable(_objects(ref))
    # no marker vouches for bytes it does not describe
    for name in ("square", "offset"):
        d = DatasetDir(storage.join(killed, name))
        for sid in d.done_ids():
            d.read_shard(sid, verify=True)
