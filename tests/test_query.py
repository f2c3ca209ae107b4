"""Query stage: url.lst / tables / caption search -> manifest shards, with every skipped row counted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import BuildConfig, QueryConfig
from pipeline.query import NameIndex, build_manifest, derived_label, fold, run, sample_id
from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from schemas.tables import MANIFEST


def rows(out) -> list[dict]:
    d = DatasetDir(out)
    return [r for _, t in d.iter_tables() for r in MANIFEST.validate(t).to_pylist()]


def test_url_lst_lines_spaces_duplicates_and_bad_lines(tmp_path):
    lst = tmp_path / "url.lst"
    lst.write_bytes(
        b"0 100 http://a.example/x.jpg\n"
        b"1 100 http://a.example/my photo 1.jpg\n"  # URL with spaces: tokens re-joined
        b"2 100 http://a.example/x.jpg\n"  # duplicate within label 100
        b"3 200 http://a.example/x.jpg\n"  # same URL, other identity: kept
        b"4 200\n"  # no URL
        b"5 200 ftp://a.example/y.jpg\n"  # not http(s)
        b"6 \xff\xfe http://a.example/z.jpg\n"  # not UTF-8
        b"\n"
        b"7 300 https://b.example/q.png?x=1\n"
    )
    cfg = QueryConfig(inputs=[{"path": str(lst)}], shard_size=2)
    stats = build_manifest(cfg, tmp_path / "m")
    got = rows(tmp_path / "m")
    assert [(r["source_idx"], r["source_label"], r["url"]) for r in got] == [
        ("0", "100", "http://a.example/x.jpg"),
        ("1", "100", "http://a.example/my photo 1.jpg"),
        ("3", "200", "http://a.example/x.jpg"),
        ("7", "300", "https://b.example/q.png?x=1"),
    ]
    assert got[0]["sample_id"] == sample_id("100", "http://a.example/x.jpg")
    assert len({r["sample_id"] for r in got}) == 4
    assert DatasetDir(tmp_path / "m").done_ids() == ["00000", "00001"]  # 2 rows per shard
    assert stats["rows_in"] == 8 and stats["rows_out"] == 4
    assert stats["drops"] == {"bad_url": 1, "duplicate_url": 1, "malformed_line": 1, "not_utf8": 1}
    assert stats["identities"] == 3
    assert json.loads((tmp_path / "m" / "stats.json").read_text())["drops"] == stats["drops"]


def test_tables_csv_jsonl_parquet_optouts_and_cap(tmp_path):
    (tmp_path / "a.csv").write_bytes(
        "name,url\nJosé Álvarez,http://img.example/1.jpg\n../../x,http://img.example/2.jpg\n"
        ",http://img.example/3.jpg\nBad \udcff,http://img.example/4.jpg\n".encode("utf-8", "surrogateescape")
    )
    (tmp_path / "b.jsonl").write_text(
        '{"label": "L7", "name": "Ann Lee", "url": "http://cdn.blocked.example/a.jpg"}\n'
        '{"label": "L7", "name": "Ann Lee", "url": "http://ok.example/a.jpg"}\n'
        '{"label": "L7", "name": "Ann Lee", "url": "http://ok.example/b.jpg"}\n'
        '{"label": "L7", "name": "Ann Lee", "url": "http://ok.example/c.jpg"}\n'
        "not json\n"
    )
    pq.write_table(pa.table({"name": ["OPTED Out", "Zed"], "url": ["http://ok.example/o.jpg", "http://z.example/"]}),
                   tmp_path / "c.parquet")
    cfg = QueryConfig(
        inputs=[{"path": str(tmp_path / "a.csv")}, {"path": str(tmp_path / "b.jsonl"), "per_name_cap": 2},
                {"path": str(tmp_path / "c.parquet")}],
        optout_names=["opted out"],  # case-insensitive
        optout_domains=["blocked.example"],  # suffix match on the host
    )
    stats = build_manifest(cfg, tmp_path / "m")
    got = rows(tmp_path / "m")
    names = [(r["name"], r["source_label"]) for r in got]
    assert names[0] == ("José Álvarez", derived_label("José Álvarez"))
    assert names[1][0] == "../../x" and "/" not in names[1][1] and "." not in names[1][1].split("-")[0]
    assert [r["url"] for r in got if r["source_label"] == "L7"] == ["http://ok.example/a.jpg", "http://ok.example/b.jpg"]
    assert names[-1][0] == "Zed"
    assert stats["drops"] == {"malformed_line": 1, "missing_field": 1, "name_cap": 1, "not_utf8": 1,
                              "optout_domain": 1, "optout_name": 1}
    assert stats["rows_in"] == stats["rows_out"] + sum(stats["drops"].values())
    # nothing but the output directory was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.jsonl", "c.parquet", "m"]


def test_caption_search_whole_word_case_accent_insensitive(tmp_path):
    captions = pa.table({
        "url": [f"http://c.example/{i}.jpg" for i in range(7)],
        "caption": [
            "Portrait of JOSE ALVAREZ at the festival",  # accent- and case-insensitive
            "josé álvarez-smith",  # '-' ends a word: a whole-word match of the name
            "Joseph Alvarez",  # not the same word
            "Ann Lee and José Álvarez",  # two names: two rows
            "annlee",  # no word boundary
            None,
            "Ann Lee again",
        ],
    })
    pq.write_table(captions, tmp_path / "laion.parquet")
    (tmp_path / "names.txt").write_text("José Álvarez\n# a comment\nAnn Lee\n")
    cfg = QueryConfig(inputs=[{"path": str(tmp_path / "laion.parquet"), "names": str(tmp_path / "names.txt"),
                               "per_name_cap": 2}])
    stats = build_manifest(cfg, tmp_path / "m")
    got = rows(tmp_path / "m")
    by_name: dict[str, list[str]] = {}
    for r in got:
        by_name.setdefault(r["name"], []).append(r["url"].rsplit("/", 1)[1])
    assert by_name == {"José Álvarez": ["0.jpg", "1.jpg"], "Ann Lee": ["3.jpg", "6.jpg"]}
    assert stats["drops"] == {"name_cap": 1, "no_match": 3}


def test_name_index_and_fold():
    idx = NameIndex(["Zoë Saldaña", "Li", "Li Na"])
    assert fold("ZOË") == "zoe"
    assert idx.find("zoe saldana on stage") == ["Zoë Saldaña"]
    assert idx.find("Li Na wins; li") == ["Li", "Li Na"]
    assert idx.find("Lina") == []


def test_rerun_same_config_is_a_no_op_and_other_config_is_refused(tmp_path):
    lst = tmp_path / "url.lst"
    lst.write_text("0 1 http://a.example/x.jpg\n")
    cfg = BuildConfig.model_validate({"query": {"inputs": [{"path": str(lst)}]}})
    first = run(cfg, {}, tmp_path / "m")
    before = (tmp_path / "m" / "part-00000.parquet").read_bytes()
    assert run(cfg, {}, tmp_path / "m") == first
    assert (tmp_path / "m" / "part-00000.parquet").read_bytes() == before
    other = BuildConfig.model_validate({"query": {"inputs": [{"path": str(lst)}], "shard_size": 5}})
    with pytest.raises(StageError, match="config"):
        run(other, {}, tmp_path / "m")
    assert run(other, {}, tmp_path / "m", overwrite=True)["rows_out"] == 1


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="not found"):
        build_manifest(QueryConfig(inputs=[{"path": str(tmp_path / "nope.lst")}]), tmp_path / "m")
    with pytest.raises(StageError, match="no inputs"):
        build_manifest(QueryConfig(), tmp_path / "m")


def test_edited_input_is_not_mistaken_for_a_finished_output(tmp_path):
    lst = tmp_path / "url.lst"
    lst.write_text("0 1 http://a.example/x.jpg\n")
    cfg = QueryConfig(inputs=[{"path": str(lst)}])
    assert build_manifest(cfg, tmp_path / "m")["rows_out"] == 1
    lst.write_text("0 1 http://a.example/x.jpg\n1 1 http://a.example/y.jpg\n")
    with pytest.raises(StageError, match="config"):
        build_manifest(cfg, tmp_path / "m")
    assert build_manifest(cfg, tmp_path / "m", overwrite=True)["rows_out"] == 2


def _lst(path, rows) -> None:
    path.write_text("".join(f"{i} {label} http://a.example/{label}/{i}.jpg\n" for i, label in rows))


def test_shards_are_name_aligned_and_big_names_get_their_own(tmp_path):
    # labels interleaved in the input; "big" has more URLs than a shard holds
    rows = [(i, lab) for i, lab in enumerate(["a", "b", "a", "big", "c"] + ["big"] * 6 + ["b", "d"])]
    _lst(tmp_path / "url.lst", rows)
    stats = build_manifest(QueryConfig(inputs=[{"path": str(tmp_path / "url.lst")}], shard_size=3), tmp_path / "m")
    d = DatasetDir(tmp_path / "m")
    shards = {sid: t.column("source_label").to_pylist() for sid, t in d.iter_tables()}
    # every label in exactly one shard, except "big" (7 URLs > 3), whose shards hold nothing else
    assert shards == {"00000": ["a", "a"], "00001": ["b", "b"], "00002": ["big"] * 3, "00003": ["big"] * 3,
                      "00004": ["big"], "00005": ["c", "d"]}
    assert d.shard_stats("00003")["split_label"] == "big" and "split_label" not in d.shard_stats("00005")
    assert stats["identities"] == 5 and stats["split_names"] == 1 and stats["rows_out"] == 13
    # rows of a name keep input order
    urls = d.read_shard("00002").column("url").to_pylist()
    assert urls == [f"http://a.example/big/{i}.jpg" for i in (3, 5, 6)]


def test_parallel_read_equals_serial(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    for k in range(3):  # names spread over several files: dedup and packing must see them all, in file order
        _lst(tmp_path / "in" / f"part{k}.lst", [(i, f"n{(i * 7 + k) % 5}") for i in range(k * 10, k * 10 + 10)])
    cfg = QueryConfig(inputs=[{"path": str(tmp_path / "in")}], shard_size=8)
    serial = build_manifest(cfg, tmp_path / "serial")
    parallel = build_manifest(cfg, tmp_path / "parallel", parallel=True)
    timing = ("seconds",)
    assert {k: v for k, v in serial.items() if k not in timing} == {k: v for k, v in parallel.items() if k not in timing}
    for sid in DatasetDir(tmp_path / "serial").done_ids():
        assert (tmp_path / "serial" / f"part-{sid}.parquet").read_bytes() == \
            (tmp_path / "parallel" / f"part-{sid}.parquet").read_bytes()
