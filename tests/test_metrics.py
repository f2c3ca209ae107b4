"""Hand-worked examples for every ReID protocol rule and for 10-fold face verification."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sapiensid.metrics import ReIDSet, evaluate_protocols, evaluate_reid
from sapiensid.verification import load_bin, pair_distances, ten_fold_accuracy, write_bin


def ordered_gallery(n: int) -> np.ndarray:
    """Unit vectors whose cosine to the query direction (1, 0) strictly decreases with the index."""
    angles = np.linspace(0.1, 1.5, n)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


QUERY = np.array([[1.0, 0.0]])


def test_general_camera_junk_and_ap():
    # Ranked: g0 same pid+cam (junk), g1 other pid, g2 good, g3 other pid, g4 good.
    g = ReIDSet(ordered_gallery(5), pids=[1, 2, 1, 3, 1], camids=[0, 1, 1, 2, 2])
    q = ReIDSet(QUERY, pids=[1], camids=[0])
    r = evaluate_reid(q, g, "general")
    # Kept ranking g1 g2 g3 g4: good at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2.
    assert r["top1"] == 0.0 and r["top5"] == 100.0
    assert r["mAP"] == pytest.approx(50.0)
    assert r["num_valid_query"] == 1


def test_cameras_ignored_when_all_unknown():
    g = ReIDSet(ordered_gallery(5), pids=[1, 2, 1, 3, 1], camids=[-1] * 5)
    q = ReIDSet(QUERY, pids=[1], camids=[-1])
    r = evaluate_reid(q, g, "general")
    # No junk: good at ranks 1, 3, 5 -> AP = (1 + 2/3 + 3/5) / 3.
    assert r["top1"] == 100.0
    assert r["mAP"] == pytest.approx(100.0 * (1 + 2 / 3 + 3 / 5) / 3)


def test_queries_without_good_match_are_excluded():
    g = ReIDSet(ordered_gallery(4), pids=[1, 2, 1, 5], camids=[1, 1, 0, 0])
    feats = np.concatenate([QUERY, QUERY, QUERY])
    # q0 pid 1 cam 0: g0 good at rank 1. q1 pid 9: nobody. q2 pid 5 cam 0: only g3, same camera -> junk.
    q = ReIDSet(feats, pids=[1, 9, 5], camids=[0, 0, 0])
    r = evaluate_reid(q, g, "general")
    assert r["num_query"] == 3 and r["num_valid_query"] == 1
    assert r["top1"] == 100.0 and r["mAP"] == pytest.approx(100.0)


def test_no_valid_query_gives_nan():
    g = ReIDSet(ordered_gallery(2), pids=[2, 3], camids=[1, 1])
    r = evaluate_reid(ReIDSet(QUERY, pids=[1], camids=[0]), g)
    assert r["num_valid_query"] == 0 and math.isnan(r["top1"]) and math.isnan(r["mAP"])


def clothes_example() -> tuple[ReIDSet, ReIDSet]:
    # Query: pid 1, cam 0, clothes 10. Ranked gallery:
    # g0 pid1 cam1 c10 | g1 pid2 cam1 c20 | g2 pid1 cam1 c11 | g3 pid1 cam0 c11 | g4 pid1 cam2 c10
    g = ReIDSet(
        ordered_gallery(5), pids=[1, 2, 1, 1, 1], camids=[1, 1, 1, 0, 2], clothes=[10, 20, 11, 11, 10]
    )
    q = ReIDSet(QUERY, pids=[1], camids=[0], clothes=[10])
    return q, g


def test_general_with_clothes():
    q, g = clothes_example()
    r = evaluate_reid(q, g, "general")
    # g3 junk (same camera); kept g0 g1 g2 g4, good at 1, 3, 4.
    assert r["top1"] == 100.0
    assert r["mAP"] == pytest.approx(100.0 * (1 + 2 / 3 + 3 / 4) / 3)


def test_same_clothes_protocol():
    q, g = clothes_example()
    r = evaluate_reid(q, g, "same_clothes")
    # good g0, g4; junk g2 (other clothes), g3 (same camera); kept g0 g1 g4 -> ranks 1, 3.
    assert r["top1"] == 100.0
    assert r["mAP"] == pytest.approx(100.0 * (1 + 2 / 3) / 2)


def test_clothes_changing_protocol():
    q, g = clothes_example()
    r = evaluate_reid(q, g, "clothes_changing")
    # good g2 only; junk g0, g4 (same clothes), g3 (same camera); kept g1 g2 -> rank 2.
    assert r["top1"] == 0.0 and r["top5"] == 100.0
    assert r["mAP"] == pytest.approx(50.0)


def test_clothes_protocols_need_clothes_ids():
    g = ReIDSet(ordered_gallery(2), pids=[1, 2], camids=[1, 1])
    with pytest.raises(ValueError, match="clothes"):
        evaluate_reid(ReIDSet(QUERY, pids=[1], camids=[0]), g, "clothes_changing")
    assert set(evaluate_protocols(ReIDSet(QUERY, pids=[1], camids=[0]), g)) == {"general"}
    q, g2 = clothes_example()
    assert set(evaluate_protocols(q, g2)) == {"general", "same_clothes", "clothes_changing"}


def test_ties_keep_gallery_order():
    same = np.array([[0.6, 0.8], [0.6, 0.8]])
    q = ReIDSet(QUERY, pids=[1], camids=[0])
    # Equal similarity: the earlier gallery item ranks first.
    r_bad_first = evaluate_reid(q, ReIDSet(same, pids=[2, 1], camids=[1, 1]))
    assert r_bad_first["top1"] == 0.0 and r_bad_first["mAP"] == pytest.approx(50.0)
    r_good_first = evaluate_reid(q, ReIDSet(same, pids=[1, 2], camids=[1, 1]))
    assert r_good_first["top1"] == 100.0 and r_good_first["mAP"] == pytest.approx(100.0)


def test_self_match_is_junk():
    feats = ordered_gallery(3)
    g = ReIDSet(feats, pids=[1, 2, 1], camids=[-1] * 3, item_ids=["a", "b", "c"])
    q = ReIDSet(feats[:1], pids=[1], camids=[-1], item_ids=["a"])
    r = evaluate_reid(q, g)
    # "a" itself is dropped; kept b (other pid), c (good) -> rank 2.
    assert r["top1"] == 0.0 and r["mAP"] == pytest.approx(50.0)


def test_blocks_give_same_result():
    rng = np.random.default_rng(0)
    gf, qf = rng.normal(size=(40, 8)), rng.normal(size=(25, 8))
    g = ReIDSet(gf, pids=rng.integers(0, 5, 40), camids=rng.integers(0, 3, 40))
    q = ReIDSet(qf, pids=rng.integers(0, 5, 25), camids=rng.integers(0, 3, 25))
    assert evaluate_reid(q, g, block=4) == evaluate_reid(q, g, block=1000)


def test_ten_fold_accuracy_hand_worked():
    issame = np.array([True, False] * 10)
    dist = np.where(issame, 0.5, 1.5)
    clean = ten_fold_accuracy(dist, issame)
    assert clean["accuracy"] == pytest.approx(100.0) and clean["std"] == pytest.approx(0.0)
    assert clean["threshold"] == pytest.approx(0.51)  # first grid value that separates
    dist[0] = 2.0  # pair 0 (fold 0) is a positive no threshold can save
    noisy = ten_fold_accuracy(dist, issame)
    # Fold 0: 1 of 2 right; folds 1..9: 2 of 2 -> mean 95 %, std sqrt((0.45^2 + 9*0.05^2)/10) = 15 %.
    assert noisy["accuracy"] == pytest.approx(95.0)
    assert noisy["std"] == pytest.approx(15.0)


def test_pair_distances_and_bin_roundtrip(tmp_path):
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert pair_distances(emb) == pytest.approx([0.0, 2.0])
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    write_bin(tmp_path / "x.bin", imgs, np.array([True, False]))
    back, issame = load_bin(tmp_path / "x.bin")
    assert len(back) == 4 and back[0].shape == (112, 112, 3) and issame.tolist() == [True, False]
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.bin"):
        load_bin(tmp_path / "bad.bin")
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(ValueError, match="posix.system|os.system"):
        load_bin(tmp_path / "evil.bin")
