"""Clean on real photos (registry-package assets) through the real query, download (img2dataset from
loopback), persons (YOLO11n-pose) and faces (RetinaFace-mnet0.25 + dlib) stages:

- "Barack_Obama": two Obama photos, plus Obama's first photo mirrored and cropped, and Biden's photo with
  three copies (mirrored, cropped, re-encoded at half size). Counted naively Biden has 4 photos to Obama's 4;
  with copies collapsed Obama has 2 and Biden 1, so the name is Obama, once per photo (the copy rule keeps
  one of the three copies of his first photo), and every other copy is a `near_duplicate` naming the row kept.
- "Two_People": three photos that each show Obama (a different photo each time) next to Biden (rotated and
  rescaled differently, on another background, so not a copy): the two people tie, the name yields no
  identity (`ambiguous_name`).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageEnhance, ImageOps

from pipeline import registry
from pipeline.assets import asset_path
from pipeline.config import BuildConfig
from pipeline.shards import DatasetDir
from tests.realchain_support import build_real_chain

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def _open(name: str) -> Image.Image:
    im = Image.open(asset_path(name)).convert("RGB")
    im.thumbnail((640, 640))
    return im


def _jpg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.crop((int(w * 0.08), int(h * 0.04), w - int(w * 0.04), h - int(h * 0.08)))


def _pair(left: Image.Image, right: Image.Image, angle: float, scale: float, bg: tuple[int, int, int],
          light: float) -> Image.Image:
    """A new photo: `left` beside a transformed `right` on a coloured background."""
    canvas = Image.new("RGB", (1100, 560), bg)
    a = left.copy()
    a.thumbnail((520, 520))
    canvas.paste(a, (10, 20))
    b = ImageEnhance.Brightness(right).enhance(light).rotate(angle, expand=True, fillcolor=bg)
    b.thumbnail((int(520 * scale), int(520 * scale)))
    canvas.paste(b, (560 + (520 - b.width) // 2, 20 + (520 - b.height) // 2))
    return canvas


def _images() -> dict[str, tuple[str, bytes]]:
    obama, obama2, obama3, biden = (_open(n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"))
    half = biden.resize((biden.width // 2, biden.height // 2))
    return {
        "obama.jpg": ("Barack_Obama", _jpg(obama)),
        "obama2.jpg": ("Barack_Obama", _jpg(obama2)),
        "obama_mirrored.jpg": ("Barack_Obama", _jpg(ImageOps.mirror(obama))),
        "obama_cropped.jpg": ("Barack_Obama", _jpg(_crop(obama))),
        "biden.jpg": ("Barack_Obama", _jpg(biden)),
        "biden_mirrored.jpg": ("Barack_Obama", _jpg(ImageOps.mirror(biden))),
        "biden_cropped.jpg": ("Barack_Obama", _jpg(_crop(biden))),
        "biden_small.jpg": ("Barack_Obama", _jpg(half, 40)),
        "pair0.jpg": ("Two_People", _jpg(_pair(obama, biden, -12, 0.95, (40, 90, 160), 1.0))),
        "pair1.jpg": ("Two_People", _jpg(_pair(obama2, biden, 0, 0.75, (200, 190, 150), 0.8))),
        "pair2.jpg": ("Two_People", _jpg(_pair(obama3, biden, 12, 0.85, (90, 140, 70), 1.2))),
    }


def test_real_photos_copies_count_once_and_two_people_names_yield_nothing(tmp_path):
    photos = [(n, label, data) for n, (label, data) in _images().items()]  # every name is a .jpg
    raw = build_real_chain(tmp_path, photos, shard_size=6, until="faces")

    build = tmp_path / "build"
    cfg = BuildConfig.model_validate(raw)
    stats = registry.run_stage("clean", cfg, {"faces": build / "faces", "persons": build / "persons"},
                               tmp_path / "clean")
    urls = {r["sample_id"]: r["url"].rsplit("/", 1)[1]
            for _, t in DatasetDir(build / "query").iter_tables() for r in t.to_pylist()}
    sel = [r for _, t in DatasetDir(tmp_path / "clean").iter_tables() for r in t.to_pylist()]
    by_pid = {r["person_id"]: r for r in sel}
    seen = [(urls[r["sample_id"]], r["detection_index"], r["reason"],
             urls[by_pid[r["duplicate_of"]]["sample_id"]] if r["duplicate_of"] else None) for r in sel]

    groups = {"obama": {"obama.jpg", "obama_mirrored.jpg", "obama_cropped.jpg"},
              "biden": {"biden.jpg", "biden_mirrored.jpg", "biden_cropped.jpg", "biden_small.jpg"}}
    mine = [r for r in sel if r["source_label"] == "Barack_Obama"]
    assert len(mine) == 8, seen  # one face per photo
    kept = [urls[r["sample_id"]] for r in mine if r["kept"]]
    # Obama twice: obama2.jpg and one copy of his first photo (whichever the copy rule keeps), once each.
    assert len(kept) == 2 and "obama2.jpg" in kept and len(set(kept) & groups["obama"]) == 1, seen
    assert {r["identity"] for r in mine if r["kept"]} == {"Barack_Obama"}
    # Every other copy is a near_duplicate naming the row kept for its photo, in its own group.
    for who, files in groups.items():
        rows = [r for r in mine if urls[r["sample_id"]] in files]
        keeper = [r for r in rows if r["reason"] != "near_duplicate"]
        assert len(keeper) == 1, (who, seen)
        assert all(r["duplicate_of"] == keeper[0]["person_id"] for r in rows if r is not keeper[0]), (who, seen)
    assert stats["steps"]["copies"]["near_duplicate"] == 5
    pairs = [r for r in sel if r["source_label"] == "Two_People"]
    assert len(pairs) == 6, seen  # both people found in each of the three photos
    assert {r["reason"] for r in pairs} == {"ambiguous_name"}, seen
    assert stats["steps"]["cluster"]["ambiguous_names"] == 1
