"""`webbody remove`: an opt-out rewrites only the shards holding the subject, leaves no trace of it, and the
bundle still verifies; a rerun of the bundle stage does not bring the subject back."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.bundle import run
from pipeline.bundle.remove import remove_subject
from pipeline.bundle.report import write_report
from pipeline.bundle.verify import verify_bundle
from pipeline.shards import file_sha256
from pipeline.stage import StageError
from tests.bundle_support import identity_direction, make_build, small_config

NAMES = {3: "Ada Subject", 5: "Grace Example"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("remove")
    inputs = make_build(root, n_ids=8, per_id=6, names=NAMES)
    run(small_config(), inputs, root / "bundle")
    write_report(root / "bundle")
    return root, inputs


@pytest.fixture
def bundle(source, tmp_path):
    root, inputs = source
    out = tmp_path / "bundle"
    shutil.copytree(root / "bundle", out)
    return out, inputs


def _all_bytes(out) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.iterdir()) if p.is_file())


def _index(out):
    return pq.read_table(out / "index.parquet").to_pylist()


def test_remove_by_name_leaves_no_trace(bundle):
    out, inputs = bundle
    before = _index(out)
    subject = [r for r in before if r["name"] == "Ada Subject"]
    ident = subject[0]["identity"]
    touched = {r["shard"] for r in subject}
    untouched = {s: file_sha256(out / s) for s in {r["shard"] for r in before} - touched}
    result = remove_subject(out, name="  ada   SUBJECT ")
    assert result["samples"] == len(subject) == 6 and result["identities"] == 1
    assert verify_bundle(out) == []
    after = _index(out)
    assert len(after) == len(before) - 6 and not any(r["identity"] == ident for r in after)
    # only the subject's shards changed
    assert all(file_sha256(out / s) == sha for s, sha in untouched.items())
    # no trace: not in any shard, index, centers, stats or report (by name, url, key or identity)
    blob = _all_bytes(out)  # shards, index, centers, stats, report and every window's part, stats and marker
    for r in subject:
        for needle in (r["name"], r["url"], r["key"], r["person_id"], ident):
            assert needle.encode() not in blob, needle
    assert "Ada Subject" not in (out / "report.html").read_text()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["removals"] == {"requests": 1, "samples": 6} and stats["rows_out"] == len(after)
    # other samples kept their bytes (same checksums as before)
    old = {r["key"]: r["member_sha256"] for r in before}
    assert all(old[r["key"]] == r["member_sha256"] for r in after)
    # re-running the bundle stage over the same selection does not bring the subject back
    run(small_config(), inputs, out)
    assert not any(r["identity"] == ident for r in _index(out)) and verify_bundle(out) == []


def test_remove_by_url_takes_one_photo(bundle):
    out, _ = bundle
    before = _index(out)
    target = before[3]
    remove_subject(out, url=target["url"])
    after = _index(out)
    assert [r for r in after if r["url"] == target["url"]] == []
    assert len(after) == len(before) - sum(r["url"] == target["url"] for r in before)
    assert verify_bundle(out) == []
    # the identity stays, its center is recomputed from the remaining .face.npy members
    centers = {r["identity"]: r for r in pq.read_table(out / "centers.parquet").to_pylist()}
    assert centers[target["identity"]]["count"] == sum(r["identity"] == target["identity"] for r in after)


def test_remove_by_face_matches_the_identity_center(bundle, tmp_path):
    out, _ = bundle
    photo = tmp_path / "request.jpg"
    photo.write_bytes(b"unused by the stand-in embedder")
    rng = np.random.default_rng(5)

    def embed(path):  # stands in for the face models: a new photo of identity 5 (Grace Example)
        assert path == photo
        return identity_direction(5) * 9 + rng.normal(scale=0.3, size=128).astype(np.float32), "dlib"

    result = remove_subject(out, face=photo, embed=embed)
    assert result["identities"] == 1 and result["samples"] == 6
    assert not any(r["name"] == "Grace Example" for r in _index(out))
    assert {r["name"] for r in _index(out)} >= {"Ada Subject"}
    assert verify_bundle(out) == []

    def stranger(path):
        return identity_direction(99), "dlib"

    assert remove_subject(out, face=photo, embed=stranger)["samples"] == 0

    def other_model(path):
        return identity_direction(1), "kprpe"

    with pytest.raises(StageError, match="embedder"):
        remove_subject(out, face=photo, embed=other_model)


def test_remove_needs_exactly_one_selector(bundle):
    out, _ = bundle
    with pytest.raises(StageError, match="exactly one"):
        remove_subject(out, name="a", url="b")


def test_cli_remove_then_report(bundle):
    from flows.cli import main

    out, _ = bundle
    assert main(["remove", str(out), "--name", "Grace Example"]) == 0
    assert not any(r["name"] == "Grace Example" for r in _index(out))
    assert main(["report", str(out)]) == 0 and "Grace Example" not in (out / "report.html").read_text()


def test_rebuild_after_removal_keeps_the_opt_out(bundle):
    """A window packed again after a removal (e.g. the build was resumed) leaves the removed photo out, and the
    shrunk identity's center counts only its remaining samples; an unfinished bundle is refused by remove."""
    out, inputs = bundle
    target = _index(out)[3]
    remove_subject(out, url=target["url"])
    after = _index(out)
    want = {r["identity"]: r for r in pq.read_table(out / "centers.parquet").to_pylist()}
    (out / "part-00000.done").unlink()  # as if a rebuild was interrupted: the window is packed again
    with pytest.raises(StageError, match="unfinished windows"):
        remove_subject(out, name="Ada Subject")
    run(small_config(), inputs, out)
    assert _index(out) == after and verify_bundle(out) == []
    got = {r["identity"]: r for r in pq.read_table(out / "centers.parquet").to_pylist()}
    assert got.keys() == want.keys()
    for ident, row in want.items():
        assert got[ident]["count"] == row["count"]
        assert np.allclose(np.frombuffer(got[ident]["center"], "<f4"), np.frombuffer(row["center"], "<f4"), atol=1e-3)
