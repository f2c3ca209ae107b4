"""Faces stage geometry without models: the official upper-body pre-crop and its fall-backs, square padding,
5-point similarity alignment, detector prior/anchor layouts, NMS, and the float16 feature storage."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.faces.align import (
    ARCFACE_112,
    AlignError,
    detector_canvas,
    pad_to_square,
    similarity_to_template,
    transform_points,
    upper_body_box,
    warp_face,
    warp_region,
)
from pipeline.faces.detectors import biubug6_priors, insightface_anchor_centres, nms
from pipeline.faces.stage import decode_feature, feature_columns


def kps(points: dict[int, tuple[float, float]], conf: float = 0.9) -> np.ndarray:
    """17 x (x, y, conf); unlisted points invisible (conf 0) at a plausible but ignored position."""
    k = np.zeros((17, 3))
    k[:, :2] = 50.0
    for i, (x, y) in points.items():
        k[i] = (x, y, conf)
    return k.reshape(-1)


# A person facing the camera in a 200 x 400 body crop.
FACE_POINTS = {0: (100, 60), 1: (92, 52), 2: (108, 52), 3: (84, 56), 4: (116, 56), 5: (70, 110), 6: (130, 112)}


def test_upper_body_box_follows_the_official_rule():
    # Box of kps 0-6: x 70..130, y 52..112 (w 60, h 60). x: -/+ 0.375*60 -> 47..152; top: 52 - 1.5*60 -> 0
    # (clipped); bottom: lowest shoulder 112; both ears visible -> x = [84 - 16, 116 + 16].
    assert upper_body_box(kps(FACE_POINTS), 200, 400) == (68, 0, 132, 112)
    no_ears = {k: v for k, v in FACE_POINTS.items() if k not in (3, 4)}
    # Box x 70..130 y 52..112 -> x 47..152, y max(0, 52 - 90) = 0, bottom 112.
    assert upper_body_box(kps(no_ears), 200, 400) == (47, 0, 152, 112)
    one_ear = {k: v for k, v in FACE_POINTS.items() if k != 4}
    assert upper_body_box(kps(one_ear), 200, 400) == (47, 0, 152, 112)  # the ear rule needs both ears


def test_upper_body_box_expands_from_truncated_integers():
    pts = {0: (100.9, 150.7), 5: (80.2, 200.9), 6: (121.6, 199.2)}
    # ints: x 80..121 (w 41), y 150..200 (h 50): x1 = int(80 - 15.375) = 64, x2 = int(121 + 15.375) = 136,
    # y1 = int(150 - 75) = 75, bottom = int(max shoulder y 200.9) = 200.
    assert upper_body_box(kps(pts), 300, 500) == (64, 75, 136, 200)


@pytest.mark.parametrize(
    "points, why",
    [
        ({0: (100, 60), 1: (92, 52), 2: (108, 52)}, "no body keypoint among 5..16"),
        ({0: (100, 60), 1: (92, 52), 11: (90, 200)}, "no shoulder visible"),
        ({5: (70, 110), 11: (90, 200)}, "fewer than 2 visible among 0..6"),
        ({5: (70, 110), 6: (130, 110)}, "kps-0..6 box has zero height"),
        ({0: (100, 60), 3: (100, 56), 4: (100, 57), 5: (70, 110)}, "ears at one x: the ear rule leaves no width"),
    ],
)
def test_upper_body_box_falls_back_to_the_whole_crop(points, why):
    assert upper_body_box(kps(points), 200, 400) == (0, 0, 200, 400), why


def test_low_confidence_points_are_invisible():
    # Everything below the 0.5 YOLO visibility threshold: the whole crop.
    assert upper_body_box(kps(FACE_POINTS, conf=0.3), 200, 400) == (0, 0, 200, 400)
    assert upper_body_box(kps(FACE_POINTS, conf=0.3), 200, 400, min_conf=0.25) == (68, 0, 132, 112)


def test_pad_to_square_centres_with_black():
    img = np.full((10, 4, 3), 200, np.uint8)
    sq, left, top = pad_to_square(img)
    assert sq.shape == (10, 10, 3) and (left, top) == (3, 0)
    assert (sq[:, 3:7] == 200).all() and (sq[:, :3] == 0).all() and (sq[:, 7:] == 0).all()
    wide = np.zeros((3, 8, 3), np.uint8)
    sq, left, top = pad_to_square(wide)
    assert sq.shape == (8, 8, 3) and (left, top) == (0, 2)  # odd remainder goes to the bottom, as official


def test_detector_canvas_is_the_padded_square_resized():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)
    region = (40, 30, 240, 130)  # 200 x 100: padded to 200 x 200 with 50 black rows above and below
    canvas, scale, shift = detector_canvas(img, region, 160)
    square, left, top = pad_to_square(img[30:130, 40:240])
    ref = cv2.resize(square, (160, 160), interpolation=cv2.INTER_AREA)
    assert canvas.shape == (160, 160, 3) and (canvas[:40] == 0).all() and (canvas[120:] == 0).all()
    assert np.abs(canvas[41:119].astype(int) - ref[41:119]).mean() < 1.0
    # canvas px -> body px: the canvas corners of the crop land on the region corners.
    assert np.allclose(np.array([0, 40]) * scale + shift, [40, 30])
    assert np.allclose(np.array([160, 120]) * scale + shift, [240, 130])


def test_warp_region_equals_warping_the_padded_square():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    region = (20, 10, 180, 120)
    square, left, top = pad_to_square(img[10:120, 20:180])
    landmarks_sq = ARCFACE_112 * 1.2 + np.array([10.0, 30.0])  # in square px
    landmarks_body = landmarks_sq + np.array([20 - left, 10 - top])
    ref = warp_face(square, similarity_to_template(landmarks_sq))
    got = warp_region(img, region, similarity_to_template(landmarks_body))
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_similarity_recovers_a_known_transform():
    angle, scale, shift = np.deg2rad(20.0), 2.5, np.array([40.0, -7.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = ARCFACE_112 @ rot.T + shift  # the template seen through a known similarity
    m = similarity_to_template(landmarks)
    assert np.allclose(transform_points(landmarks, m), ARCFACE_112, atol=1e-6)
    assert np.isclose(np.sqrt(np.linalg.det(m[:, :2])), 1 / scale)


def test_warp_puts_the_landmarks_on_the_template():
    rng = np.random.default_rng(0)
    img = np.zeros((300, 300, 3), np.uint8)
    landmarks = ARCFACE_112 * 1.8 + np.array([60.0, 40.0])
    for x, y in landmarks:
        img[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    m = similarity_to_template(landmarks + rng.normal(0, 0.01, landmarks.shape))
    aligned = warp_face(img, m)
    assert aligned.shape == (112, 112, 3)
    for x, y in ARCFACE_112:
        assert aligned[int(round(y)), int(round(x))].max() > 100  # each bright dot lands on its template point


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.full((5, 2), np.nan), np.tile([[3.0, 4.0]], (5, 1))])
def test_degenerate_landmarks_fail_alignment(bad):
    with pytest.raises(AlignError):
        similarity_to_template(bad)


def test_biubug6_priors_layout():
    pri = biubug6_priors(160, 160)
    # strides 8/16/32 on 160: 20x20, 10x10, 5x5 cells, two min sizes each.
    assert pri.shape == (2 * (400 + 100 + 25), 4)
    assert np.allclose(pri[0], [4 / 160, 4 / 160, 16 / 160, 16 / 160])
    assert np.allclose(pri[1], [4 / 160, 4 / 160, 32 / 160, 32 / 160])  # min sizes vary fastest
    assert np.allclose(pri[2], [12 / 160, 4 / 160, 16 / 160, 16 / 160])  # then x
    assert np.allclose(pri[800], [8 / 160, 8 / 160, 64 / 160, 64 / 160])  # stride 16 starts at 800
    assert biubug6_priors(100, 60).shape[0] == 2 * (13 * 8 + 7 * 4 + 4 * 2)  # ceil on each side


def test_insightface_anchor_centres():
    c = insightface_anchor_centres(64, 32, 16, 2)
    assert c.shape == (4 * 2 * 2, 2)
    assert np.array_equal(c[:4], [[0, 0], [0, 0], [16, 0], [16, 0]])  # grid corners, repeated per anchor
    assert np.array_equal(c[4], [0, 16])


def test_nms_keeps_best_of_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.8, 0.9, 0.5, 0.1], np.float32)
    assert nms(boxes, scores, 0.4).tolist() == [1, 2]
    assert nms(boxes, scores, 0.95).tolist() == [1, 0, 2, 3]


def test_feature_storage_is_float16_little_endian_with_float32_norm():
    f = np.array([3.0, -4.0, 0.1, 1000.5], np.float32)
    cols = feature_columns(f, "dlib")
    assert cols["feature_dim"] == 4 and cols["embedder"] == "dlib"
    assert cols["feature"] == np.array(f, dtype="<f2").tobytes() and len(cols["feature"]) == 8
    assert np.isclose(cols["feature_norm"], np.linalg.norm(f))
    assert np.allclose(decode_feature(cols["feature"], 4), f, rtol=1e-3)
    with pytest.raises(ValueError, match="expected 5"):
        decode_feature(cols["feature"], 5)
