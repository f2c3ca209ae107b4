"""`webbody verify`: an intact bundle passes; a flipped byte, a missing member, a truncated or stray tar fail
with a message naming the shard and the member."""

from __future__ import annotations

import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.bundle import run
from pipeline.bundle.verify import verify_bundle, verify_main
from tests.bundle_support import make_build, small_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    run(small_config(), make_build(root, n_ids=5, per_id=4), root / "bundle")
    return root / "bundle"


@pytest.fixture
def bundle(pristine, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(pristine, out)
    return out


def _first(bundle):
    row = pq.read_table(bundle / "index.parquet").to_pylist()[0]
    return bundle / row["shard"], row


def test_intact_passes(bundle, capsys):
    assert verify_main(bundle) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize("member", ["jpg", "json"])
def test_flipped_byte_in_a_member(bundle, member, capsys):
    tar, row = _first(bundle)
    data = bytearray(tar.read_bytes())
    data[row[f"{member}_offset"] + 7] ^= 0x40
    tar.write_bytes(bytes(data))
    assert verify_main(bundle) == 1
    err = capsys.readouterr().err
    assert f"{tar.name}: {row['key']}.{member}: sha256 mismatch" in err


def test_flipped_byte_in_a_header(bundle):
    tar, row = _first(bundle)
    data = bytearray(tar.read_bytes())
    data[row["offset"] + 3] ^= 0x01  # inside the first member's name
    tar.write_bytes(bytes(data))
    problems = [str(p) for p in verify_bundle(bundle)]
    assert any(tar.name in p and "unreadable" in p for p in problems), problems


def test_flipped_byte_in_padding_is_caught_by_the_file_checksum(bundle):
    tar, row = _first(bundle)
    data = bytearray(tar.read_bytes())
    pad_at = row["jpg_offset"] + row["jpg_size"]  # the zero padding after the image
    assert row["jpg_size"] % 512, "this sample's image needs padding for the test"
    data[pad_at] ^= 0x01
    tar.write_bytes(bytes(data))
    problems = [str(p) for p in verify_bundle(bundle)]
    assert problems == [f"{tar.name}: sha256 differs from stats.json although every member matches: a tar header "
                        "or padding byte changed"]


def test_missing_member(bundle, capsys):
    tar, row = _first(bundle)
    rebuilt = tar.with_suffix(".new")
    with tarfile.open(tar) as src, tarfile.open(rebuilt, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            if m.name != f"{row['key']}.json":
                dst.addfile(m, src.extractfile(m))
    rebuilt.replace(tar)
    assert verify_main(bundle) == 1
    assert f"{tar.name}: {row['key']}.json: member missing" in capsys.readouterr().err


def test_truncated_tar(bundle, capsys):
    tar, row = _first(bundle)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])
    assert verify_main(bundle) == 1
    err = capsys.readouterr().err
    assert f"{tar.name}: size" in err and "truncated" in err
    assert "missing from the tar" in err or "member missing" in err or "unreadable" in err


def test_stray_and_missing_shards(bundle):
    tar, _ = _first(bundle)
    shutil.copy(tar, bundle / "webbody-train-999999.tar")
    tar.unlink()
    problems = [str(p) for p in verify_bundle(bundle)]
    assert "webbody-train-999999.tar: shard on disk but not in stats.json (stray or renamed file)" in problems
    assert f"{tar.name}: shard listed in stats.json is missing" in problems


def test_bad_record_values(bundle):
    import hashlib
    import json

    import pyarrow as pa

    from pipeline.shards import atomic_write_parquet

    # A record whose keypoint leaves the frame, re-packed with matching checksums: only the range check can see it.
    tar, row = _first(bundle)
    data = bytearray(tar.read_bytes())
    meta = json.loads(bytes(data[row["json_offset"]: row["json_offset"] + row["json_size"]]))
    meta["keypoints"][0] = [900.0, 10.0, 0.99]
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    blob = blob[: row["json_size"]].ljust(row["json_size"], b" ")  # same length: offsets stay valid
    data[row["json_offset"]: row["json_offset"] + row["json_size"]] = blob
    tar.write_bytes(bytes(data))
    table = pq.read_table(bundle / "index.parquet")
    sha = table.column("json_sha256").to_pylist()
    sha[0] = hashlib.sha256(blob).hexdigest()
    table = table.set_column(table.schema.get_field_index("json_sha256"), "json_sha256", pa.array(sha))
    atomic_write_parquet(bundle / "index.parquet", table)
    problems = [str(p) for p in verify_bundle(bundle)]
    assert any(f"{row['key']}.json" in p and "outside the image" in p for p in problems), problems


def test_missing_index_is_a_problem(bundle):
    (bundle / "index.parquet").unlink()
    assert [str(p) for p in verify_bundle(bundle)] == ["index.parquet: missing"]


def test_cli_exit_codes(bundle, tmp_path):
    from flows.cli import main

    assert main(["verify", str(bundle)]) == 0
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    tar, row = _first(bundle)
    data = bytearray(tar.read_bytes())
    data[row["jpg_offset"] + 100] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["verify", "--quiet", str(bundle)]) == 1
