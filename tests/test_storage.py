"""pipeline.storage and DatasetDir on local folders and memory://: round trips, one-listing completion,
commit order, clear errors for unknown schemes, mangled URIs and credentials in URIs."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.shards import DatasetDir, ShardCorrupt
from pipeline.storage import StorageError


def _mem() -> str:
    return f"memory://t-{uuid.uuid4().hex[:8]}/d"


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_round_trips(tmp_path, kind):
    root = str(tmp_path / "d") if kind == "local" else _mem()
    a = storage.join(root, "a.bin")
    storage.put_bytes(a, b"hello")
    assert storage.get_bytes(a) == b"hello" and storage.exists(a) and storage.size(a) == 5
    with storage.open_read(a) as fh:
        fh.seek(1)
        assert fh.read(3) == b"ell"
    with storage.open_write(storage.join(root, "big.bin")) as fh:
        fh.write(b"x" * 1000)
    t = pa.table({"k": [3, 1, 2]})
    data = storage.write_parquet(storage.join(root, "t.parquet"), t)
    assert storage.read_parquet(storage.join(root, "t.parquet")).equals(t)
    assert storage.get_bytes(storage.join(root, "t.parquet")) == data
    storage.put_json(storage.join(root, "j.json"), {"b": 1, "a": [1]})
    assert storage.get_json(storage.join(root, "j.json")) == {"a": [1], "b": 1}
    assert storage.list_dir(root) == {"a.bin": 5, "big.bin": 1000, "t.parquet": len(data),
                                      "j.json": len(storage.json_bytes({"a": [1], "b": 1}))}
    storage.delete_many([a, storage.join(root, "missing")])
    assert "a.bin" not in storage.list_dir(root)
    assert storage.list_dir(storage.join(root, "nothing-here")) == {}
    with pytest.raises(StorageError, match="not found"):
        storage.get_bytes(a)


def test_failed_streaming_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.tar"
    with pytest.raises(RuntimeError):
        with storage.open_write(str(target)) as fh:
            fh.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_unknown_scheme_is_an_error_never_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="unknown storage scheme 'ftp://'"):
        DatasetDir("ftp://host/x").commit_shard("00000", pa.table({"a": [1]}), {})
    with pytest.raises(StorageError, match="lost a slash"):
        DatasetDir(Path("s3://bucket/x"))  # pathlib made it s3:/bucket/x
    assert list(tmp_path.iterdir()) == []


def test_gcs_without_gcsfs_names_the_package():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="gcsfs"):
            storage.resolve("gs://bucket/x")
    else:
        pytest.skip("gcsfs installed")


def test_credentials_in_uri_are_refused_and_not_echoed():
    with pytest.raises(StorageError) as exc:
        storage.resolve("s3://AKIAEXAMPLE:s3cr3t@bucket/x")
    assert "s3cr3t" not in str(exc.value) and "AKIAEXAMPLE" not in str(exc.value)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_dataset_dir_commit_and_listing(tmp_path, kind):
    root = str(tmp_path / "d") if kind == "local" else _mem()
    d = DatasetDir(root)
    t = pa.table({"sample_id": ["b", "a"]})
    marker = d.commit_shard("00001", t, {"rows_in": 2}, files={"extra.bin": b"123"})
    assert marker["rows"] == 2 and marker["files"]["extra.bin"]["bytes"] == 3
    fresh = DatasetDir(root)
    assert fresh.done_ids() == ["00001"] and fresh.is_done("00001") and not fresh.is_done("00000")
    assert fresh.read_shard("00001", verify=True).equals(t)
    assert fresh.shard_stats("00001") == {"rows_in": 2}
    assert fresh.num_rows("00001") == 2
    # a shard without its marker is not done; a parquet replaced behind its marker is caught when read
    storage.delete(fresh.join("part-00001.done"))
    assert DatasetDir(root).done_ids() == []
    d.commit_shard("00002", t, {})
    storage.write_parquet(d.join("part-00002.parquet"), pa.table({"sample_id": ["z"]}))
    with pytest.raises(ShardCorrupt, match="differs from its marker"):
        DatasetDir(root).read_shard("00002", verify=True)


def test_bad_shard_id_and_extra_names(tmp_path):
    d = DatasetDir(tmp_path)
    with pytest.raises(ValueError, match="5\\+ digits"):
        d.commit_shard("1", pa.table({"a": [1]}), {})
    with pytest.raises(ValueError, match="plain file name"):
        d.commit_shard("00000", pa.table({"a": [1]}), {}, files={"../x": b""})
