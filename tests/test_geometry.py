"""Property tests of box padding, clipping, crops with fill and coordinate transforms (pipeline.geometry)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.geometry import (
    Transform,
    clip_box,
    crop_window,
    crop_with_fill,
    letterbox_geometry,
    letterbox_image,
    pad_box,
)

# deadline=None everywhere: a loaded CI machine must not turn slowness into failures.
coord = st.floats(-2000, 2000, allow_nan=False, allow_infinity=False)
size = st.floats(0, 1500, allow_nan=False, allow_infinity=False)
frac = st.floats(0, 0.5, allow_nan=False, allow_infinity=False)


@st.composite
def boxes(draw):
    x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
    return np.array([x, y, x + w, y + h])


@settings(deadline=None)
@given(boxes(), frac)
def test_pad_box_grows_each_side_by_fraction_and_keeps_centre(box, f):
    p = pad_box(box, f)
    w, h = box[2] - box[0], box[3] - box[1]
    assert p[2] - p[0] == pytest.approx(w * (1 + 2 * f), abs=1e-6)
    assert p[3] - p[1] == pytest.approx(h * (1 + 2 * f), abs=1e-6)
    assert (p[0] + p[2]) / 2 == pytest.approx((box[0] + box[2]) / 2, abs=1e-6)
    assert (p[1] + p[3]) / 2 == pytest.approx((box[1] + box[3]) / 2, abs=1e-6)
    assert p[0] <= box[0] and p[1] <= box[1] and p[2] >= box[2] and p[3] >= box[3]


def test_pad_box_paper_example_and_bad_box():
    # 100x200 box padded 5%: 5 px left/right, 10 px top/bottom, not clipped at 0.
    assert pad_box([2, 4, 102, 204], 0.05).tolist() == pytest.approx([-3, -6, 107, 214])
    with pytest.raises(ValueError, match="negative"):
        pad_box([10, 0, 5, 5], 0.05)


@settings(deadline=None)
@given(boxes(), st.integers(1, 800), st.integers(1, 800))
def test_clip_box_stays_inside_image_and_inside_box(box, w, h):
    c = clip_box(box, w, h)
    assert 0 <= c[0] <= c[2] <= w and 0 <= c[1] <= c[3] <= h
    # Clipping is idempotent, and a box already inside is unchanged.
    assert np.allclose(clip_box(c, w, h), c)


@settings(deadline=None)
@given(boxes())
def test_crop_window_covers_box_with_integer_edges(box):
    x0, y0, x1, y1 = crop_window(box)
    assert all(isinstance(v, int) for v in (x0, y0, x1, y1))
    assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
    assert x1 - x0 >= 1 and y1 - y0 >= 1
    # No more than one extra pixel on either side (floor/ceil), beyond the 1 px minimum.
    assert x1 - x0 <= max(1, math.ceil(box[2] - box[0]) + 1)
    assert y1 - y0 <= max(1, math.ceil(box[3] - box[1]) + 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(-50, 50), st.integers(-50, 50), st.integers(1, 60),
       st.integers(1, 60), st.integers(0, 255))
def test_crop_with_fill_copies_inside_and_fills_outside(h, w, x0, y0, cw, ch, fill):
    rng = np.random.default_rng(h * 100 + w)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    window = (x0, y0, x0 + cw, y0 + ch)
    crop = crop_with_fill(img, window, fill)
    assert crop.shape == (ch, cw, 3) and crop.dtype == np.uint8
    for cy in range(ch):
        for cx in range(cw):
            sx, sy = x0 + cx, y0 + cy
            expected = img[sy, sx] if (0 <= sx < w and 0 <= sy < h) else np.array([fill] * 3)
            assert (crop[cy, cx] == expected).all()


def test_crop_with_fill_rejects_empty_window():
    with pytest.raises(ValueError, match="empty"):
        crop_with_fill(np.zeros((4, 4, 3), np.uint8), (2, 2, 2, 5))


transforms = st.builds(
    Transform,
    st.floats(0.01, 100), st.floats(0.01, 100), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4),
)
points = st.lists(st.tuples(coord, coord, st.floats(0, 1)), min_size=1, max_size=17)


@settings(deadline=None)
@given(transforms, points)
def test_transform_round_trip_keeps_points_and_confidence(t, pts):
    arr = np.array(pts)
    there = t.points(arr)
    back = t.inverse().points(there)
    assert np.allclose(back, arr, rtol=1e-9, atol=1e-6)
    assert (there[:, 2] == arr[:, 2]).all()  # confidence is never a coordinate


@settings(deadline=None)
@given(transforms, transforms, points)
def test_transform_composition_equals_sequential_application(a, b, pts):
    arr = np.array(pts)
    assert np.allclose(a.then(b).points(arr), b.points(a.points(arr)), rtol=1e-9, atol=1e-6)


@settings(deadline=None)
@given(boxes(), points)
def test_crop_transform_matches_crop_pixels(box, pts):
    window = crop_window(box)
    t = Transform.crop(window)
    arr = np.array(pts)
    local = t.points(arr)
    assert np.allclose(local[:, :2] + np.array(window[:2]), arr[:, :2])


@settings(deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(32, 1024))
def test_letterbox_transform_puts_image_centred_in_canvas(w, h, s):
    t = letterbox_geometry(w, h, s)
    x1, y1, x2, y2 = t.box([0, 0, w, h])
    assert min(x1, y1) >= -1e-6 and max(x2, y2) <= s + 1e-6
    assert max(x2 - x1, y2 - y1) == pytest.approx(s)
    # centred to the whole pixel (floor of the margin) plus the rounding of the side (up to 1 px for a side
    # that rounds to 0 and is kept at 1)
    assert abs(x1 - (s - x2)) <= 2 and abs(y1 - (s - y2)) <= 2


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 300), st.integers(8, 300), st.integers(32, 200))
def test_letterbox_image_transform_agrees_with_pixels(w, h, s):
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 2, w // 2] = 0  # content is black; the fill is white
    canvas, t = letterbox_image(img, s, fill=255)
    assert canvas.shape == (s, s, 3)
    x1, y1, x2, y2 = t.box([0, 0, w, h])
    xi1, yi1, xi2, yi2 = (int(v) for v in t.content_box)  # the pasted pixels: whole-pixel offsets
    assert np.allclose([x1, y1], [xi1, yi1]) and np.abs(np.array([x2, y2]) - [xi2, yi2]).max() <= 0.5
    assert (canvas[yi1:yi2, xi1:xi2] == 0).all()
    outside = np.ones((s, s), bool)
    outside[yi1:yi2, xi1:xi2] = False
    assert (canvas[outside] == 255).all()
