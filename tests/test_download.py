"""Download stage: bad input served from 127.0.0.1, image repair, SSRF guard, stats, retry pass, resume."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.assets import asset_path
from pipeline.config import BuildConfig
from pipeline.download import retry_failed_urls
from pipeline.download import run as download_run
from pipeline.download.errors import status_code
from pipeline.download.images import ImageRejected, repair_image, resize
from pipeline.query import build_manifest
from pipeline.shards import DatasetDir
from pipeline.urlsafety import AllowList, build_guarded_opener, check_url, why_not_public
from schemas.tables import DOWNLOAD
from tests.servers import Route, closed_port_url, serving

JPEG = {"Content-Type": "image/jpeg"}
PNG = {"Content-Type": "image/png"}


# -- image builders (synthetic, generated here; real photos come from registry packages) ---------------------


def jpeg(w: int, h: int, color=(200, 30, 30), exif_orientation: int | None = None, mode: str = "RGB") -> bytes:
    im = Image.new(mode, (w, h), color)
    if exif_orientation is not None:
        # left half red, right half blue: rotation is visible in the output
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, : w // 2] = (255, 0, 0)
        arr[:, w // 2 :] = (0, 0, 255)
        im = Image.fromarray(arr)
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
        return buf.getvalue()
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png16(w: int = 64, h: int = 48, channels: int = 1) -> bytes:
    ramp = np.tile(np.linspace(0, 65535, w).astype(np.uint16), (h, 1))
    arr = ramp if channels == 1 else np.dstack([ramp] * 3)
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def rgba_png(w: int = 40, h: int = 40) -> bytes:
    arr = np.zeros((h, w, 4), np.uint8)
    arr[..., 1] = 255  # green, fully transparent except the centre
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png_bomb(side: int = 12_000) -> bytes:
    """A valid grey PNG of side x side pixels that compresses to a few hundred KB (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- fast unit tests ------------------------------------------------------------------------------------------


def test_repair_image_fixes_what_opencv_gets_wrong():
    # EXIF orientation 6 (rotate 90 CW): a 200x100 landscape becomes a 100x200 portrait, red on top
    n = repair_image(jpeg(200, 100, exif_orientation=6), 1e9)
    assert n.rgb.shape == (200, 100, 3) and "exif_rotated" in n.notes
    assert n.rgb[10, 50, 0] > 200 and n.rgb[190, 50, 2] > 200
    # CMYK -> RGB with the right colour (pure cyan-free red: C=0, M=255, Y=255, K=0)
    n = repair_image(jpeg(30, 20, color=(0, 255, 255, 0), mode="CMYK"), 1e9)
    assert "cmyk" in n.notes and tuple(n.rgb[10, 15]) == pytest.approx((255, 0, 0), abs=8)
    # 16-bit grey and RGB PNGs scale to 8 bits (a ramp 0..65535 -> 0..255, not clipped at 255)
    for ch in (1, 3):
        n = repair_image(png16(channels=ch), 1e9)
        assert n.rgb.dtype == np.uint8 and n.rgb.shape == (48, 64, 3)
        assert n.rgb[0, 0, 0] < 5 and n.rgb[0, -1, 0] > 250 and 100 < n.rgb[0, 32, 0] < 160
    # transparency composites onto white
    n = repair_image(rgba_png(), 1e9)
    assert tuple(n.rgb[0, 0]) == (255, 255, 255) and tuple(n.rgb[20, 20]) == (0, 255, 0)
    # animated GIF: the first frame
    n = repair_image(animated_gif(), 1e9)
    assert "animated" in n.notes and n.rgb[16, 16, 0] > 200 and n.rgb[16, 16, 2] < 50


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_body"),
        (b"<html><body>not an image</body></html>", "not_an_image"),
        (jpeg(300, 200)[:900], "truncated"),
        (jpeg(300, 200)[:300], "truncated"),
    ],
)
def test_repair_image_rejects_bad_bodies(data, code):
    with pytest.raises(ImageRejected) as info:
        repair_image(data, 1e9)
    assert info.value.code == code


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bomb()
    assert len(bomb) < 1_000_000  # 144 Mpixel in well under a megabyte
    with pytest.raises(ImageRejected) as info:
        repair_image(bomb, 89_478_485)
    assert info.value.code == "image_too_large"


def test_border_resize_matches_paper_geometry():
    rgb = np.zeros((100, 200, 3), np.uint8)
    out = resize(rgb, 640, "border", False, cv2.INTER_LANCZOS4, cv2.INTER_AREA)
    assert out.shape == (640, 640, 3)
    # 200x100 upscaled to 640x320, centred: 160 white rows above and below
    assert (out[:160] == 255).all() and (out[-160:] == 255).all() and (out[160:480] == 0).all()
    big = np.zeros((1280, 960, 3), np.uint8)
    out = resize(big, 640, "border", False, cv2.INTER_LANCZOS4, cv2.INTER_AREA)
    assert out.shape == (640, 640, 3) and (out[:, :80] == 255).all() and (out[:, 80:560] == 0).all()


@pytest.mark.parametrize(
    ("message", "status", "code"),
    [
        ("HTTP Error 404: Not Found", "failed_to_download", "http_404"),
        ("<urlopen error [Errno 111] Connection refused>", "failed_to_download", "connection_refused"),
        ("The read operation timed out", "failed_to_download", "timeout"),
        ("<urlopen error timed out>", "failed_to_download", "timeout"),
        ("Use of image disallowed by X-Robots-Tag directive", "failed_to_download", "optout_header"),
        ("<urlopen error private_address: x resolves to 10.0.0.1 (private)>", "failed_to_download",
         "private_address"),
        ("private_address: x resolves to 10.0.0.1 (private)", "failed_to_download", "private_address"),
        ("<urlopen error unknown url type: file>", "failed_to_download", "bad_url"),
        ("IncompleteRead(10 bytes read, 90 more expected)", "failed_to_download", "incomplete_read"),
        ("truncated: image file is truncated", "failed_to_resize", "truncated"),
        ("image_too_large: 12000x12000 > 89478485 pixels", "failed_to_resize", "image_too_large"),
        ("something new", "failed_to_resize", "decode_error"),
        ("something new", "failed_to_download", "download_error"),
        (None, "success", "success"),
    ],
)
def test_status_codes(message, status, code):
    assert status_code(message, status) == code


def test_url_policy():
    none = AllowList()
    assert check_url("http://10.1.2.3/a.jpg", none, resolve_dns=False) == "private_address"
    assert check_url("http://169.254.169.254/latest/meta-data", none, resolve_dns=False) == "private_address"
    assert check_url("http://[::ffff:127.0.0.1]/x", none, resolve_dns=False) == "private_address"
    assert check_url("http://[fe80::1]/x", none, resolve_dns=False) == "private_address"
    assert check_url("file:///etc/passwd", none) == "bad_url"
    assert check_url("http://example.invalid/x", none, resolve_dns=False) is None  # vetted at connect time
    assert check_url("http://localhost/x", none) == "private_address"  # the name resolves to loopback
    assert check_url("http://8.8.8.8/x", none, resolve_dns=False) is None
    assert why_not_public(__import__("ipaddress").ip_address("100.64.1.1")) is not None  # carrier-grade NAT
    assert check_url("http://127.0.0.1:9/x", AllowList(["127.0.0.0/8"]), resolve_dns=False) is None
    assert check_url("http://localhost/x", AllowList(["localhost"])) is None


def test_guarded_opener_checks_every_hop():
    routes = {
        "/ok.jpg": Route(200, JPEG, b"img"),
        "/to-private": Route(302, {"Location": "http://10.255.255.1/x.jpg"}),
        "/to-file": Route(302, {"Location": "file:///etc/passwd"}),
    }
    with serving(routes) as s:
        with pytest.raises(OSError, match="private_address"):
            build_guarded_opener([]).open(s.base_url + "/ok.jpg", timeout=2)
        opener = build_guarded_opener(["127.0.0.1"])
        assert opener.open(s.base_url + "/ok.jpg", timeout=2).read() == b"img"
        with pytest.raises(OSError, match="private_address"):
            opener.open(s.base_url + "/to-private", timeout=2)
        with pytest.raises(OSError):
            opener.open(s.base_url + "/to-file", timeout=2)
        with pytest.raises(OSError, match="unknown url type"):
            opener.open("file:///etc/passwd", timeout=2)


# -- the stage over a bad-input corpus (slow: img2dataset start-up is seconds per process) --------------------


def corpus_routes() -> dict[str, Route | list[Route]]:
    bus = asset_path("bus.jpg").read_bytes()
    zidane = asset_path("zidane.jpg").read_bytes()
    astronaut = asset_path("astronaut.png").read_bytes()
    truncated = jpeg(300, 200)
    return {
        "/bus.jpg": Route(200, JPEG, bus),
        "/zidane.jpg": Route(200, JPEG, zidane),
        "/astronaut.png": Route(200, PNG, astronaut),
        "/slow.jpg": Route(200, JPEG, jpeg(20, 20), delay=6),
        "/html.jpg": Route(200, JPEG, b"<!doctype html><html><body>moved</body></html>"),
        "/empty.jpg": Route(200, JPEG, b""),
        "/truncated.jpg": Route(200, JPEG, truncated[: len(truncated) // 3]),
        "/cut.jpg": Route(200, JPEG, truncated, truncate_to=len(truncated) // 3),
        "/bomb.png": Route(200, PNG, png_bomb()),
        "/cmyk.jpg": Route(200, JPEG, jpeg(60, 40, color=(0, 255, 255, 0), mode="CMYK")),
        "/grey16.png": Route(200, PNG, png16(channels=1)),
        "/rgb16.png": Route(200, PNG, png16(channels=3)),
        "/anim.gif": Route(200, {"Content-Type": "image/gif"}, animated_gif()),
        "/exif6.jpg": Route(200, JPEG, jpeg(200, 100, exif_orientation=6)),
        "/alpha.png": Route(200, PNG, rgba_png()),
        "/optout.jpg": Route(200, {**JPEG, "X-Robots-Tag": "noai, noimageai"}, jpeg(20, 20)),
        "/flaky.jpg": [Route(503, {"Content-Type": "text/plain"}, b"busy"), Route(200, JPEG, jpeg(50, 50))],
        "/redirect-private": Route(302, {"Location": "http://10.255.255.1/x.jpg"}),
        "/huge.jpg": Route(200, {**JPEG, "Content-Length": ""}, b"\xff" * 3_000_000),  # streamed, no length
    }


EXPECTED = {
    "bus.jpg": "success",
    "zidane.jpg": "success",
    "astronaut.png": "success",
    "missing.jpg": "http_404",
    "slow.jpg": "timeout",
    "html.jpg": "not_an_image",
    "empty.jpg": "empty_body",
    "truncated.jpg": "truncated",
    "cut.jpg": "incomplete_read",
    "bomb.png": "image_too_large",
    "cmyk.jpg": "success",
    "grey16.png": "success",
    "rgb16.png": "success",
    "anim.gif": "success",
    "exif6.jpg": "success",
    "alpha.png": "success",
    "optout.jpg": "optout_header",
    "flaky.jpg": "success",
    "redirect-private": "private_address",
    "huge.jpg": "body_too_large",
}


def tree(root: Path, skip: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """One download run over the corpus; the server stays up for the resume and retry tests."""
    root = tmp_path_factory.mktemp("dl")
    work = root / "cwd"
    work.mkdir()
    with serving(corpus_routes()) as server:
        base = server.base_url
        lines = [f"{i} L{i % 3} {base}/{name}" for i, name in enumerate(EXPECTED)]
        # path-like label; the same URL as row 0, in the same manifest shard: fetched once
        lines.insert(1, f"100 ../../x {base}/bus.jpg")
        lines += [
            f"101 L0 {base}/bus.jpg",  # duplicate within L0: dropped by the query stage
            f"102 L1 {closed_port_url()}/gone.jpg",
            "103 L2 http://10.0.0.7/private.jpg",
            "104 L2 file:///etc/passwd",
        ]
        (root / "url.lst").write_bytes(("\n".join(lines) + "\n").encode() + b"105 \xff\xfeL 1 http://x.example/a\n")
        cfg = BuildConfig.model_validate({
            "query": {"inputs": [{"path": str(root / "url.lst")}], "shard_size": 8},
            # timeout 3 s: short for the slow route, long enough for the rest on a loaded 2-core machine
            "run": {"executor": "local"},  # in-process, shard after shard (test_ray_tasks_... covers Ray)
            "download": {"allow_private_hosts": ["127.0.0.1"], "timeout": 3, "retries": 0,
                         "thread_count": 16, "max_body_bytes": 2_000_000},
        })
        before = tree(root, root / "out")
        old = os.getcwd()
        os.chdir(work)  # img2dataset must not write into the working directory either
        try:
            qstats = build_manifest(cfg.query, root / "out" / "query")
            stats = download_run(cfg, {"query": root / "out" / "query"}, root / "out" / "download")
        finally:
            os.chdir(old)
        after = tree(root, root / "out")
        yield {"root": root, "cfg": cfg, "qstats": qstats, "stats": stats, "hits": Counter(server.hits),
               "new_files": after - before, "server": server, "work": work}


def _rows(d: Path) -> list[dict]:
    return [r for _, t in DatasetDir(d).iter_tables() for r in DOWNLOAD.validate(t).to_pylist()]


@pytest.mark.slow
def test_bad_input_each_counted_under_a_reason(downloaded):
    out = downloaded["root"] / "out" / "download"
    rows = _rows(out)
    by_file = {}
    for r in rows:
        by_file.setdefault(r["url"].rsplit("/", 1)[1], set()).add(r["status"])
    for name, status in EXPECTED.items():
        assert by_file[name] == {status}, (name, by_file[name])
    assert by_file["gone.jpg"] == {"connection_refused"}
    assert by_file["private.jpg"] == {"private_address"}
    q = downloaded["qstats"]
    assert q["drops"] == {"bad_url": 1, "duplicate_url": 1, "not_utf8": 1}
    stats = downloaded["stats"]
    assert stats["complete"] and stats["rows_in"] == len(rows) == len(EXPECTED) + 3
    assert stats["rows_out"] == sum(r["status"] == "success" for r in rows)
    assert stats["drops"] == dict(Counter(r["status"] for r in rows if r["status"] != "success"))
    # flaky.jpg (503, then the image) is recovered by the retry pass; on a loaded machine another row may be too
    assert stats["notes"]["url_reused"] == 1 and stats["notes"]["recovered_by_retry"] >= 1
    # download shard ids are the manifest's
    assert DatasetDir(out).done_ids() == DatasetDir(downloaded["root"] / "out" / "query").done_ids()
    hits = downloaded["hits"]
    assert hits["/bus.jpg"] == 1  # two identities, one fetch
    assert hits["/flaky.jpg"] == 2 and hits["/slow.jpg"] == 2  # the retry pass re-tried transient failures
    assert hits["/html.jpg"] == 1 and hits["/missing.jpg"] == 1  # permanent failures are not retried


@pytest.mark.slow
def test_images_are_repaired_and_bordered(downloaded):
    rows = {r["url"].rsplit("/", 1)[1]: r for r in _rows(downloaded["root"] / "out" / "download")
            if r["status"] == "success"}
    for r in rows.values():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "JPEG" and im.size == (640, 640) and im.mode == "RGB"
        assert (r["width"], r["height"]) == (640, 640)
        assert r["image_sha256"] == __import__("hashlib").sha256(r["image"]).hexdigest()
    bus = np.asarray(Image.open(io.BytesIO(rows["bus.jpg"]["image"])))
    assert (rows["bus.jpg"]["original_width"], rows["bus.jpg"]["original_height"]) == (810, 1080)
    assert bus[:, :30].min() > 245 and bus[:, -30:].min() > 245  # white side borders of a portrait photo
    ex = np.asarray(Image.open(io.BytesIO(rows["exif6.jpg"]["image"])))
    assert (rows["exif6.jpg"]["original_width"], rows["exif6.jpg"]["original_height"]) == (100, 200)
    assert ex[100, 320, 0] > 200 and ex[540, 320, 2] > 200  # rotated upright: red top, blue bottom
    cmyk = np.asarray(Image.open(io.BytesIO(rows["cmyk.jpg"]["image"])))
    assert tuple(cmyk[320, 320]) == pytest.approx((255, 0, 0), abs=12)
    g16 = np.asarray(Image.open(io.BytesIO(rows["grey16.png"]["image"])))
    assert g16[320, 5, 0] < 20 and g16[320, 634, 0] > 235  # a full 0..255 ramp, not clipped
    alpha = np.asarray(Image.open(io.BytesIO(rows["alpha.png"]["image"])))
    assert alpha[10, 10].min() > 245 and alpha[320, 320, 1] > 230 and alpha[320, 320, 0] < 25


@pytest.mark.slow
def test_nothing_written_outside_the_output(downloaded):
    assert downloaded["new_files"] == set()
    assert list(downloaded["work"].iterdir()) == []
    out = downloaded["root"] / "out" / "download"
    assert not (out / "_work").exists()  # no unit scratch left behind (the shards are built in memory)
    assert not any(p.name.startswith("..") for p in out.rglob("*"))


@pytest.mark.slow
def test_resume_redoes_only_unfinished_shards_then_retry_pass(downloaded):
    root, cfg, server = downloaded["root"], downloaded["cfg"], downloaded["server"]
    out = DatasetDir(root / "out" / "download")
    before = {sid: out.parquet(sid).read_bytes() for sid in out.done_ids()}
    hits_before = Counter(server.hits)
    out.marker("00001").unlink()  # as if killed before shard 00001 was committed
    # no retry pass this time (its settings are runtime-only, so the finished shards stay valid): one job
    quick = cfg.model_copy(update={"download": cfg.download.model_copy(update={"retry_failed": False})})
    stats = download_run(quick, {"query": root / "out" / "query"}, out.root)
    assert stats["complete"]
    # the redone shard is byte-identical (deterministic), the others were not touched
    for sid, data in before.items():
        assert out.parquet(sid).read_bytes() == data, sid
    refetched = Counter(server.hits) - hits_before
    redone_urls = {r["url"].replace(server.base_url, "") for r in out.read_shard("00001").to_pylist()}
    assert set(refetched) <= redone_urls and refetched
    # a later retry pass: the 404 now serves an image, so that row is recovered and its shard rewritten
    server.routes["/missing.jpg"] = [Route(200, JPEG, jpeg(64, 64, color=(0, 200, 0)))]
    result = retry_failed_urls(cfg, out.root, codes=frozenset({"http_404"}))
    assert result == {"retried": 1, "recovered": 1, "shards_rewritten": 1}
    rows = {r["url"].rsplit("/", 1)[1]: r for r in _rows(out.root)}
    assert rows["missing.jpg"]["status"] == "success" and rows["missing.jpg"]["image"]
    rollup = __import__("json").loads((out.root / "stats.json").read_text())
    assert "http_404" not in rollup["drops"] and rollup["rows_out"] == downloaded["stats"]["rows_out"] + 1


def test_plain_jpeg_output_is_byte_identical_to_img2dataset_resizer():
    """The paper's images come from img2dataset's resizer: for ordinary photos ours must give the same bytes."""
    from img2dataset.resizer import Resizer

    from pipeline.download.worker import WebBodyResizer

    kw = {"image_size": 640, "resize_mode": "border", "resize_only_if_bigger": False, "encode_quality": 85}
    theirs, ours = Resizer(**kw), WebBodyResizer(**kw)
    photo = Image.open(asset_path("zidane.jpg")).convert("RGB")
    for size in ((1280, 720), (300, 500), (640, 640)):
        buf = io.BytesIO()
        photo.resize(size).save(buf, "JPEG", quality=90)
        a, b = theirs(io.BytesIO(buf.getvalue())), ours(io.BytesIO(buf.getvalue()))
        assert b[-1] is None and a[0] == b[0] and a[1:5] == b[1:5]


def test_with_a_proxy_the_target_name_is_still_checked(monkeypatch):
    # The proxy (a loopback server, allowed) would connect to the target itself; the guarded opener must
    # refuse the private target by name before sending anything to the proxy.
    # a proxy receives absolute URLs as the request path
    with serving({"http://8.8.8.8/x.jpg": Route(200, JPEG, b"img")}) as proxy:
        monkeypatch.setenv("http_proxy", proxy.base_url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        opener = build_guarded_opener(["127.0.0.1"])
        with pytest.raises(OSError, match="private_address"):
            opener.open("http://10.255.255.1/x.jpg", timeout=2)
        assert sum(proxy.hits.values()) == 0
        # a public target name goes through the proxy (which answers for it here)
        assert opener.open("http://8.8.8.8/x.jpg", timeout=2).read() == b"img"
        assert sum(proxy.hits.values()) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_ray_tasks_when_the_executor_is_ray(tmp_path, ray_local, caplog):
    """With run.executor ray, each manifest shard is one Ray task (the contract's executor) that commits its
    own shard."""
    import logging

    import ray

    caplog.set_level(logging.INFO, logger="pipeline.download")

    address = ray.get_runtime_context().gcs_address
    routes = {f"/p{i}.jpg": Route(200, JPEG, jpeg(120 + i, 90)) for i in range(3)}
    with serving(routes) as server:
        (tmp_path / "url.lst").write_text("".join(f"{i} A{i} {server.base_url}/p{i}.jpg\n" for i in range(3)))
        cfg = BuildConfig.model_validate({
            "run": {"executor": "ray", "ray_address": address},
            "query": {"inputs": [{"path": str(tmp_path / "url.lst")}], "shard_size": 1},
            "download": {"allow_private_hosts": ["127.0.0.1"], "thread_count": 4},
        })
        build_manifest(cfg.query, tmp_path / "query")
        stats = download_run(cfg, {"query": tmp_path / "query"}, tmp_path / "download")
    assert stats["rows_out"] == 3 and stats["drops"] == {} and stats["shards_done"] == 3
    assert stats["run"]["units"] == 3 and stats["run"]["resubmitted"] == 0
    assert stats["run"]["workers"] == 2  # tasks in flight: the cluster's CPUs (the tests' local Ray has 2)
    assert "(ray executor" in caplog.text
    rows = _rows(tmp_path / "download")
    assert sorted(Image.open(io.BytesIO(r["image"])).size for r in rows) == [(640, 640)] * 3


def test_response_bodies_are_capped():
    big = b"x" * 5000
    routes = {
        "/announced": Route(200, JPEG, big),  # Content-Length says 5000
        "/streamed": Route(200, {**JPEG, "Content-Length": ""}, big),  # no length: read until close
        "/small": Route(200, JPEG, b"y" * 1000),
    }
    with serving(routes) as s:
        opener = build_guarded_opener(["127.0.0.1"], max_body_bytes=1000)
        for path in ("/announced", "/streamed"):
            with pytest.raises(OSError, match="body_too_large"):
                with opener.open(s.base_url + path, timeout=2) as r:
                    r.read()
        with opener.open(s.base_url + "/small", timeout=2) as r:
            assert r.read() == b"y" * 1000 and r.headers["Content-Type"] == "image/jpeg"
    assert status_code("body_too_large: more than 1000 bytes", "failed_to_download") == "body_too_large"


def test_download_workers_do_not_import_torch():
    """img2dataset's package __init__ imports torch (main -> writer -> webdataset); a download worker loads
    only its downloader and resizer modules (pipeline/download/i2d.py), and the package API still works.
    albumentations and wandb (imported by those modules, unused by a download) load only when used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pipeline.runtime import ensure_offline_env\n"
        "ensure_offline_env()\n"
        "import pipeline.executors, pipeline.download, pipeline.download.fetch, pipeline.download.worker\n"
        "from pipeline.download.i2d import module\n"
        "assert module('downloader').Downloader and pipeline.download.worker.Resizer\n"
        "print('torch' in sys.modules, 'webdataset' in sys.modules)\n"
        "print('albumentations.core' in sys.modules, 'wandb.sdk' in sys.modules)\n"
        "import albumentations, wandb\n"
        "print(callable(albumentations.LongestMaxSize), bool(albumentations.__version__), callable(wandb.init))\n"
        "from img2dataset import download\n"
        "print(callable(download))\n"
    )
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "False", "False", "True", "True", "True", "True"]
