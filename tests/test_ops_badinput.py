"""Bad input through the whole pipeline: every kind ends counted under a reason or as a clear error.

One build (query -> download -> persons -> faces -> clean -> bundle, real models, local executor) over a
URL list served from 127.0.0.1 that mixes real photos with 20+ kinds of bad input: HTTP errors, a timeout,
HTML, empty and truncated bodies, a decompression bomb, opt-out headers, private/loopback addresses (direct
and by redirect), non-http schemes, malformed URLs, duplicate URLs, invalid UTF-8 and path-like names, grey,
alpha, CMYK, 1-pixel, person-less and tiny-person images, and an identity with a single photo. Checked: the
build completes; each bad row is accounted for under its reason at the stage that meets it; no row vanishes
between stages; nothing is written outside the output directory and no bundle member name escapes; no secret
from the environment reaches the outputs. Then the run-level errors: a corrupt model file and a config with
wrong types fail fast with a message naming the culprit.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.shards import DatasetDir
from pipeline.stage import StageError
from tests.faults import subprocess_env
from tests.secret_scan import scan_for_secrets
from tests.servers import Route, serving

pytestmark = [pytest.mark.integration, pytest.mark.realmodel]

REPO = Path(__file__).resolve().parent.parent
SECRET_ENV = {"WEBBODY_TEST_API_TOKEN": "tok-Leak-Canary-77301", "PREFECT_API_AUTH_STRING": "admin:canary-5519"}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _photos() -> dict[str, Image.Image]:
    from pipeline.assets import asset_path

    return {n: Image.open(asset_path(n)).convert("RGB")
            for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "grace_hopper.jpg", "astronaut.png", "zidane.jpg")}


def _alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    a = np.full((rgba.height, rgba.width), 255, np.uint8)
    a[:, : rgba.width // 6] = 0  # a transparent band
    rgba.putalpha(Image.fromarray(a))
    return rgba


def _tiny_person(img: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (1600, 1600), (90, 120, 90))
    canvas.paste(img.resize((max(8, img.width // 16), max(8, img.height // 16))), (800, 800))
    return canvas


# (label, path or absolute URL, expected download status set or None when query must drop the line)
def corpus(base: str, ipv6_base: str) -> tuple[dict[str, Route], list[tuple[bytes, bytes]], dict[str, set[str]]]:
    p = _photos()
    rng = np.random.default_rng(0)
    jpg = {"Content-Type": "image/jpeg"}
    png = {"Content-Type": "image/png"}
    routes: dict[str, Route] = {
        "/obama1.jpg": Route(200, jpg, _jpeg(p["obama.jpg"])),
        "/obama2.jpg": Route(200, jpg, _jpeg(p["obama2.jpg"])),
        "/obama3_cmyk.jpg": Route(200, jpg, _jpeg(p["obama3.jpg"].convert("CMYK"))),
        "/grace_grey.jpg": Route(200, jpg, _jpeg(p["grace_hopper.jpg"].convert("L"))),
        "/grace_alpha.png": Route(200, png, _png(_alpha(p["grace_hopper.jpg"].transpose(Image.FLIP_LEFT_RIGHT)))),
        "/grace_grey_png.png": Route(200, png, _png(p["grace_hopper.jpg"].convert("LA").crop((20, 10, 500, 600)))),
        "/eileen.png": Route(200, png, _png(p["astronaut.png"])),
        "/err500.jpg": Route(500, {}, b"oops"),
        "/page.html": Route(200, {"Content-Type": "text/html"}, b"<html><body>not an image</body></html>"),
        "/empty.jpg": Route(200, jpg, b""),
        "/truncated.jpg": Route(200, jpg, _jpeg(p["obama.jpg"]), truncate_to=2000),
        "/slow.jpg": Route(200, jpg, _jpeg(p["obama2.jpg"]), delay=4.0),
        "/optout.jpg": Route(200, {**jpg, "X-Robots-Tag": "noai"}, _jpeg(p["obama.jpg"])),
        "/bomb.png": Route(200, png, _png(Image.new("L", (10_000, 10_000), 255))),
        "/tiny.png": Route(200, png, _png(Image.new("RGB", (1, 1), (200, 10, 10)))),
        "/noise.jpg": Route(200, jpg, _jpeg(Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)))),
        "/tiny_person.jpg": Route(200, jpg, _jpeg(_tiny_person(p["zidane.jpg"]))),
        "/redirect.jpg": Route(302, {"Location": f"{ipv6_base}/obama1.jpg"}, b""),
    }
    lines: list[tuple[bytes, bytes]] = []  # (label bytes, url bytes)
    expect: dict[str, set[str]] = {}

    def add(label: str | bytes, url: str, status: set[str] | None) -> None:
        lines.append((label.encode() if isinstance(label, str) else label, url.encode()))
        expect[url] = status if status is not None else set()

    ok = {"success"}
    add("Barack_Obama", f"{base}/obama1.jpg", ok)
    add("Barack_Obama", f"{base}/obama2.jpg", ok)
    add("Barack_Obama", f"{base}/obama3_cmyk.jpg", ok)              # CMYK JPEG
    add("Barack_Obama", f"{base}/obama1.jpg", None)                 # duplicate URL: dropped by query
    add("Grace_Hopper", f"{base}/grace_grey.jpg", ok)               # grey
    add("Grace_Hopper", f"{base}/grace_alpha.png", ok)              # alpha
    add("Grace_Hopper", f"{base}/grace_grey_png.png", ok)           # grey + alpha
    add("Eileen_Collins", f"{base}/eileen.png", ok)                 # an identity with one image
    add("Barack_Obama", f"{base}/missing.jpg", {"http_404"})
    add("Barack_Obama", f"{base}/err500.jpg", {"http_500"})
    add("Barack_Obama", f"{base}/page.html", {"not_an_image", "decode_error"})
    add("Barack_Obama", f"{base}/empty.jpg", {"empty_body", "not_an_image", "decode_error"})
    add("Barack_Obama", f"{base}/truncated.jpg", {"truncated", "incomplete_read", "decode_error"})
    add("Barack_Obama", f"{base}/slow.jpg", {"timeout"})
    add("Barack_Obama", f"{base}/optout.jpg", {"optout_header"})
    add("Barack_Obama", f"{base}/bomb.png", {"image_too_large"})
    add("Barack_Obama", f"{base}/tiny.png", ok)                     # downloads; no person in it
    add("Barack_Obama", f"{base}/noise.jpg", ok)                    # downloads; no person in it
    add("Zinedine_Zidane", f"{base}/tiny_person.jpg", ok)           # a person far too small
    add("Barack_Obama", f"{ipv6_base}/obama1.jpg", {"private_address"})   # loopback, not in the allow-list
    add("Barack_Obama", f"{base}/redirect.jpg", {"private_address"})      # redirect into a private address
    add("Barack_Obama", "file:///etc/passwd", {"bad_url"})
    add("Barack_Obama", "ftp://127.0.0.1/x.jpg", {"bad_url"})
    add("Barack_Obama", "http://", {"bad_url"})
    add("../../../../tmp/escape", f"{base}/obama2.jpg?v=path", ok)  # path-like name
    add("..\\..\\win\\escape", f"{base}/obama1.jpg?v=bs", ok)
    add("/abs/name", f"{base}/obama3_cmyk.jpg?v=abs", ok)
    add("名前_テスト", f"{base}/grace_grey.jpg?v=uni", ok)            # non-ASCII UTF-8 name
    add(b"bad\xff\xfeutf8", f"{base}/grace_alpha.png?v=bytes", None)  # invalid UTF-8: dropped by query
    # The server matches path + query string: serve the `?v=` variants (distinct URLs) with the same bytes.
    for url in list(expect):
        if url.startswith(base) and "?" in url:
            routes[url[len(base):]] = routes[url[len(base):].split("?")[0]]
    return routes, lines, expect


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    import os

    from flows.build import build_plain
    from flows.demo import resolve_asset_refs

    root = tmp_path_factory.mktemp("badinput")
    sandbox = root / "sandbox"
    sandbox.mkdir()
    (sandbox / "canary.txt").write_text("outside the build")
    before = {p for p in root.parent.rglob("*")}
    old_env = {k: os.environ.get(k) for k in SECRET_ENV}
    os.environ.update(SECRET_ENV)
    try:
        with serving({}) as server:
            base = server.base_url
            ipv6_base = base.replace("127.0.0.1", "[::1]")
            routes, lines, expect = corpus(base, ipv6_base)
            server.routes.update({k: [r] for k, r in routes.items()})
            url_lst = sandbox / "url.lst"
            url_lst.write_bytes(b"".join(f"{i} ".encode() + lab + b" " + url + b"\n"
                                         for i, (lab, url) in enumerate(lines)))
            cfg = resolve_asset_refs(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()))
            cfg["run"]["executor"] = "local"
            # the clean defaults (min_images 2, dlib's own thresholds), not the demo's single-photo settings:
            # this corpus checks that names with one photo are counted, not kept
            cfg.pop("clean", None)
            cfg["query"].update(inputs=[{"path": str(url_lst), "format": "url_lst"}], shard_size=6)
            cfg["download"].update(timeout=2, retries=0, retry_failed=False, allow_private_hosts=["127.0.0.1"])
            config = sandbox / "bad.yaml"
            config.write_text(yaml.safe_dump(cfg, sort_keys=False))
            out = sandbox / "build"
            result = build_plain(config_path=str(config), output=str(out))
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    after = {p for p in root.parent.rglob("*")}
    return {"out": out, "result": result, "expect": expect, "lines": lines, "config": config,
            "new_paths": after - before, "root": root}


def _table(d: Path):
    return [r for _, t in DatasetDir(d).iter_tables() for r in t.to_pylist()]


def _stats(d: Path) -> dict:
    return json.loads((d / "stats.json").read_text())


def test_build_completes_with_a_bundle(bad_build):
    out = bad_build["out"]
    for stage in ("query", "download", "persons", "faces", "clean", "bundle"):
        assert (out / stage / "stats.json").exists(), f"{stage} did not finish"
    assert list((out / "bundle").glob("webbody-*.tar")), "no WebDataset shard"


def test_query_counts_every_line(bad_build):
    out = bad_build["out"]
    st = _stats(out / "query")
    manifest = _table(out / "query")
    n_lines = len(bad_build["lines"])
    assert st["rows_out"] == len(manifest)
    assert st["rows_out"] + sum(st["drops"].values()) == n_lines, st
    urls = Counter(r["url"] for r in manifest)
    assert all(c == 1 for c in urls.values()), "a duplicate URL survived the query"
    dropped = [u for u, s in bad_build["expect"].items() if not s]
    assert len(dropped) == 2 and sum(st["drops"].values()) >= 2


def test_download_reasons(bad_build):
    out = bad_build["out"]
    rows = _table(out / "download")
    manifest = _table(out / "query")
    assert len(rows) == len(manifest), "download must keep one row per manifest row"
    by_url = {r["url"]: r["status"] for r in rows}
    wrong = {}
    for url, allowed in bad_build["expect"].items():
        if not allowed or url not in by_url:
            continue
        if by_url[url] not in allowed:
            wrong[url] = (by_url[url], sorted(allowed))
    assert wrong == {}
    # Query may refuse non-http schemes itself: then they are counted there, never silently lost.
    missing = [u for u, s in bad_build["expect"].items() if s and u not in by_url]
    assert all(not u.startswith("http://127.0.0.1") for u in missing), missing
    st = _stats(out / "download")
    assert st["rows_in"] == len(manifest)
    assert sum(st["drops"].values()) == sum(1 for r in rows if r["status"] != "success")


def test_every_stage_accounts_for_its_rows(bad_build):
    out = bad_build["out"]
    dl = _table(out / "download")
    persons = _stats(out / "persons")
    n_fail = sum(1 for r in dl if r["status"] != "success")
    assert persons["rows_in"] == len(dl)
    assert persons["drops"].get("not_downloaded") == n_fail
    assert persons["drops"].get("no_person", 0) >= 3, persons  # 1-pixel, noise, tiny person
    faces = _stats(out / "faces")
    assert faces["rows_in"] == persons["rows_out"]
    assert faces["rows_in"] == faces["rows_out"] + sum(faces["drops"].values())
    clean_rows = _table(out / "clean")
    assert len(clean_rows) == faces["rows_out"]
    for r in clean_rows:
        assert r["kept"] == (r["reason"] is None), r
    reasons = Counter(r["reason"] for r in clean_rows if not r["kept"])
    # Grace Hopper's three encodings of one photo count once (near_duplicate, docs/clean.md), so she and Eileen
    # Collins (one photo) each have a single face: no DBSCAN cluster of two, so noise
    assert reasons["near_duplicate"] >= 2 and reasons["dbscan_noise"] >= 2, reasons
    kept = [r for r in clean_rows if r["kept"]]
    bundle = _stats(out / "bundle")
    assert bundle["rows_out"] == len(kept)


def test_nothing_escapes_the_output_directory(bad_build):
    out, root = bad_build["out"], bad_build["root"]
    sandbox = out.parent
    outside = [p for p in bad_build["new_paths"] if not (p == root or root in p.parents)]
    assert outside == [], f"files written outside the test's directory: {outside[:5]}"
    stray = [p for p in bad_build["new_paths"] if root in p.parents and not (p == sandbox or sandbox in p.parents)]
    assert stray == [], f"files written beside the build: {stray[:5]}"
    for tar in (out / "bundle").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                assert m.isfile(), m.name
                assert not m.name.startswith("/") and ".." not in m.name.split("/") and "\\" not in m.name, m.name
    index = pq.read_table(out / "bundle" / "index.parquet").to_pylist()
    assert all("/" not in r["key"] and ".." not in r["key"] for r in index)


def test_no_secret_reaches_outputs_or_logs(bad_build):
    findings = scan_for_secrets(bad_build["out"], extra_values=SECRET_ENV, env={})
    assert findings == [], "\n".join(map(str, findings))


def test_corrupt_model_file_is_a_clear_error(bad_build, tmp_path):
    from flows.build import load_build_config, run_one_stage

    corrupt = tmp_path / "yolo_corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint" + bytes(range(256)) * 4)
    cfg = load_build_config(str(bad_build["config"]), None, {"persons.model": str(corrupt)})
    build = tmp_path / "build"
    build.mkdir()
    (build / "download").symlink_to(bad_build["out"] / "download")
    with pytest.raises(StageError, match="yolo_corrupt.pt"):
        run_one_stage("persons", cfg, build)
    for key, name in (("faces.detector_model", "det_corrupt.onnx"),
                      ("faces.embedder_model", "emb_corrupt.dat")):
        bad = tmp_path / name
        bad.write_bytes(b"\x00garbage" * 100)
        cfg = load_build_config(str(bad_build["config"]), None, {key: str(bad)})
        fresh = tmp_path / f"build-{name}"
        fresh.mkdir()
        (fresh / "persons").symlink_to(bad_build["out"] / "persons")
        with pytest.raises(StageError, match=name):
            run_one_stage("faces", cfg, fresh)


def test_config_with_wrong_types_fails_fast(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npersons:\n  batch_size: many\n  conf_threshold: 7\nrun:\n  executor: 3\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "build", str(bad), "--output", str(out),
                           "--no-prefect"], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for field in ("persons.batch_size", "persons.conf_threshold", "run.executor"):
        assert field in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
