"""Renamed columns bump a schema version, and data of the old version is still read (issue #17).

Version 1 of the manifest, download, persons and faces tables (version 2 of clean) called the source name
`label`; download called the image hash `sha256`; version 1 of the bundle index called the class id `label`
and the jpg member's hash `sha256`, and version 1 of the sample record called the class id `label`. The
old files here are made the way the old code wrote them: today's table with the old names and the old
version number in the schema metadata.
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.shards import DatasetDir
from sapiensid.data.shards import iter_decoded
from sapiensid.data.synthetic import write_shards
from sapiensid.train import infer_num_classes
from schemas.base import SCHEMA_VERSION_KEY, SchemaError
from schemas.bundle import BUNDLE_INDEX
from schemas.clean import CLEAN
from schemas.sample import SAMPLE_VERSION, upgrade_sample, validate_sample
from schemas.tables import DOWNLOAD


def as_old(table: pa.Table, renames: dict[str, str], version: int) -> pa.Table:
    """`table` as a writer of `version` made it: old column names, old version in the metadata."""
    back = {new: old for old, new in renames.items()}
    meta = dict(table.schema.metadata)
    meta[SCHEMA_VERSION_KEY] = str(version).encode()
    return table.rename_columns([back.get(n, n) for n in table.column_names]).replace_schema_metadata(meta)


def download_rows() -> pa.Table:
    return DOWNLOAD.from_rows([
        {"sample_id": "s1", "source_label": "m.0abc", "name": "Ann Lee", "url": "http://x/1.jpg",
         "status": "success", "image": b"jpg", "width": 1, "height": 1, "image_sha256": "ab" * 32},
        {"sample_id": "s2", "source_label": "m.0abc", "name": "Ann Lee", "url": "http://x/2.jpg",
         "status": "download_error", "error": "404"},
    ])


def test_old_download_shard_reads_with_todays_names(tmp_path):
    new = download_rows()
    old = as_old(new, DOWNLOAD.renames[1], 1)
    assert "label" in old.column_names and "sha256" in old.column_names
    d = DatasetDir(tmp_path / "download")
    storage.write_parquet(d.join("part-00000.parquet"), old)

    got = d.read_shard("00000")
    assert got.column_names == new.column_names
    assert got.schema.metadata[SCHEMA_VERSION_KEY] == str(DOWNLOAD.version).encode()
    assert DOWNLOAD.validate(got).equals(new)
    # a column subset named the new way is found in the old file
    sub = d.read_shard("00000", columns=["sample_id", "source_label", "image_sha256"])
    assert sub.column_names == ["sample_id", "source_label", "image_sha256"]
    assert sub.column("image_sha256").to_pylist() == ["ab" * 32, None]
    # and from bytes (the path the bundle's planner and the S3 readers take)
    blob = storage.write_parquet_bytes(old)
    assert storage.parquet_from_bytes(blob, columns=["source_label"]).column("source_label").to_pylist() == [
        "m.0abc", "m.0abc"]
    # validate upgrades a table handed to it directly too
    assert DOWNLOAD.validate(old).equals(new)


def test_versions_that_changed_more_than_names_are_refused():
    # clean version 1 differed by more than a rename: refused with what to do
    v1 = as_old(CLEAN.empty(), {}, 1)
    with pytest.raises(SchemaError, match="version 1.*re-run the stage"):
        CLEAN.validate(v1)
    # a newer version than this code knows is refused, never guessed at
    future = as_old(download_rows(), {}, DOWNLOAD.version + 1)
    with pytest.raises(SchemaError, match=f"version {DOWNLOAD.version + 1}"):
        DOWNLOAD.validate(future)
    # a missing column of today's version is still a clear error, not a silent rename
    broken = download_rows().drop_columns(["source_label"])
    with pytest.raises(SchemaError, match="missing column 'source_label'"):
        DOWNLOAD.validate(broken)


def test_old_bundle_index_reads_as_class_id_and_member_sha256():
    row = {"key": "k", "split": "train", "shard": "webbody-train-000000.tar", "position": 0, "offset": 0,
           "end": 10, "jpg_offset": 1, "jpg_size": 2, "json_offset": 3, "json_size": 4,
           "member_sha256": "aa", "json_sha256": "bb", "class_id": 7, "identity": "i", "name": "n",
           "role": "train", "subsets": [], "person_id": "p", "sample_id": "s", "url": "u",
           "image_sha256": "cc", "kp_visible": 0, "has_face": False}
    new = BUNDLE_INDEX.from_rows([row])
    old = as_old(new, BUNDLE_INDEX.renames[1], 1)
    assert {"label", "sha256"} <= set(old.column_names)
    got = BUNDLE_INDEX.validate(old)
    assert got.equals(new) and got.column("class_id").to_pylist() == [7]


def test_old_sample_records_upgrade_and_today_is_untouched():
    today = {"class_id": 3, "version": SAMPLE_VERSION}
    assert upgrade_sample(today) is today
    old = {"label": 3, "version": 1}
    assert upgrade_sample(old) == today and old == {"label": 3, "version": 1}  # a new dict, input unchanged
    assert upgrade_sample({"label": 3, "version": 99}) == {"label": 3, "version": 99}  # unknown: left to refuse
    with pytest.raises(SchemaError, match="version 99"):
        validate_sample({**_record(), "version": 99})


def _record() -> dict:
    return {"key": "k", "class_id": 0, "identity": "i", "name": "n", "split": "train", "url": "u",
            "image_sha256": "x", "sample_id": "s", "detection_index": 0,
            "keypoints": [[0.0, 0.0, 0.0]] * 17, "body_box": [0, 0, 1, 1], "content_box": [0, 0, 1, 1],
            "person_score": 0.9, "pipeline_version": "0", "config_hash": "h", "version": SAMPLE_VERSION}


def _downgrade_tar(path: str) -> None:
    """Rewrite one shard as the version-1 writer made it: `label` for the class id, version 1."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["label"] = meta.pop("class_id")
                meta["version"] = 1
                data = json.dumps(meta).encode()
            members.append((m, data))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_a_version_1_bundle_still_trains(tmp_path):
    """Shards written before the rename decode to the same class ids, and the class count is found."""
    paths = write_shards(tmp_path / "b", n_identities=3, per_identity=2, split="train", samples_per_shard=4)
    before = [(d.meta["key"], d.class_id) for d in iter_decoded(paths)]
    for p in paths:
        _downgrade_tar(p)
    with tarfile.open(paths[0]) as tar:
        first = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert first["version"] == 1 and "label" in first and "class_id" not in first
    after = [(d.meta["key"], d.class_id) for d in iter_decoded(paths)]
    assert after == before and sorted({c for _, c in after}) == [0, 1, 2]

    # the index as version 1 wrote it: `label`, `sha256`, version 1 in the metadata
    index = tmp_path / "b" / "index.parquet"
    import pyarrow.parquet as pq

    t = pq.read_table(index)
    meta = {b"webbody.table": b"bundle_index", SCHEMA_VERSION_KEY: b"1"}
    t = t.rename_columns(["label" if n == "class_id" else n for n in t.column_names]).replace_schema_metadata(meta)
    pq.write_table(t, index)
    assert infer_num_classes(str(tmp_path / "b"), "train") == 3
