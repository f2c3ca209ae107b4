"""Unit tests of the clean steps on hand-built features: clustering, one detection per photo, face score,
transitive merge, the ambiguous rule, near-duplicates, validation overlap, too-few-images."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.clean.cluster import cluster_names
from pipeline.clean.dedup import dedup_rows, drop_near_duplicates
from pipeline.clean.merge import identity_centers, merge_identities
from pipeline.clean.overlap import ValSet, remove_val_overlap
from pipeline.clean.select import clean_selection
from pipeline.clean.state import CleanState, normalise
from pipeline.clean.synthetic import at_cosine, people, photos
from pipeline.config import CleanConfig, EmbedderThresholds

DIM = 128
OFFICIAL = EmbedderThresholds()


def make_state(rows: list[tuple[str, str, np.ndarray]], scores: list[float] | None = None) -> CleanState:
    """rows: (label, photo id, feature). person ids follow row order."""
    labels = sorted({r[0] for r in rows})
    photo_ids = {p: k for k, p in enumerate(dict.fromkeys(r[1] for r in rows))}
    f = np.stack([r[2] for r in rows]).astype(np.float32)
    return CleanState(
        feats=normalise(f).astype(np.float16),
        norms=np.linalg.norm(f, axis=1).astype(np.float32),
        label=np.array([labels.index(r[0]) for r in rows], dtype=np.int64),
        labels=labels,
        photo=np.array([photo_ids[r[1]] for r in rows], dtype=np.int64),
        face_score=np.array(scores or [0.99] * len(rows), dtype=np.float32),
        order_key=np.arange(len(rows), dtype=np.int64),
    )


def person_photos(rng, center, n, cos=0.85):
    """n photos at about `cos` to the person direction (pairwise about cos^2)."""
    spread = np.sqrt(1 / cos**2 - 1)
    return photos(rng, np.repeat(center[None], n, axis=0), spread)


def cluster(state, top_k=1, budget=1_000_000):
    return cluster_names(state, OFFICIAL.dbscan_eps, OFFICIAL.dbscan_min_samples, top_k, budget)


def test_largest_cluster_kept_noise_and_smaller_clusters_dropped():
    rng = np.random.default_rng(0)
    a, b, c, d = people(rng, 4, DIM)
    feats = list(person_photos(rng, a, 5)) + list(person_photos(rng, b, 3)) + [c, d]
    state = make_state([("x", f"p{i}", f) for i, f in enumerate(feats)])
    report = cluster(state)
    assert report == {"names": 1, "identities": 1, "ambiguous_names": 0, "same_photo": 0}
    assert state.names == ["x"]
    assert list(state.ident[:5]) == [0] * 5
    assert list(state.reason[5:8]) == ["not_largest_cluster"] * 3
    assert list(state.reason[8:]) == ["dbscan_noise"] * 2

    state2 = make_state([("x", f"p{i}", f) for i, f in enumerate(feats)])
    cluster(state2, top_k=2)
    assert state2.names == ["x", "x.c1"]
    assert list(state2.ident[:8]) == [0] * 5 + [1] * 3


def test_cluster_size_counts_photos_not_detections():
    # A group photo with 3 detections of look-alikes must not outrank two separate photos of the person.
    rng = np.random.default_rng(1)
    a, b = people(rng, 2, DIM)
    group = person_photos(rng, b, 3, cos=0.95)
    solo = person_photos(rng, a, 2)
    rows = [("x", "group", f) for f in group] + [("x", f"solo{i}", f) for i, f in enumerate(solo)]
    state = make_state(rows)
    cluster(state)
    assert list(state.ident[3:]) == [0, 0]
    assert list(state.reason[:3]) == ["not_largest_cluster"] * 3


def test_one_detection_per_photo_keeps_the_most_typical():
    rng = np.random.default_rng(2)
    a = people(rng, 1, DIM)[0]
    good = person_photos(rng, a, 4, cos=0.9)
    poster = at_cosine(rng, a, 0.5)  # a second, less typical detection in photo p0
    rows = [("x", f"p{i}", f) for i, f in enumerate(good)] + [("x", "p0", poster)]
    state = make_state(rows)
    assert cluster(state)["same_photo"] == 1
    assert state.reason[4] == "same_photo" and state.ident[0] == 0


def test_batched_dbscan_equals_one_name_at_a_time():
    rng = np.random.default_rng(3)
    rows = []
    for name in range(12):
        ids = people(rng, 3, DIM)
        for k, n in enumerate(rng.integers(1, 7, size=3)):
            for f in person_photos(rng, ids[k], int(n), cos=0.8):
                rows.append((f"n{name:02d}", f"n{name}_{len(rows)}", f))
    whole, split = make_state(rows), make_state(rows)
    cluster(whole, budget=10**9)  # every name in one DBSCAN call
    cluster(split, budget=1)  # every name alone, and each name's pairs in one-row blocks
    assert whole.names == split.names
    assert np.array_equal(whole.ident, split.ident)
    assert list(whole.reason) == list(split.reason)


def test_face_score_filter_is_strictly_greater():
    rng = np.random.default_rng(4)
    a = people(rng, 1, DIM)[0]
    state = make_state([("x", f"p{i}", f) for i, f in enumerate(person_photos(rng, a, 4))],
                       scores=[0.99, 0.95, 0.5, float("nan")])
    cfg = CleanConfig(min_images=1)
    result = clean_selection(state, cfg, OFFICIAL, [])
    assert list(state.reason) == [None, "low_face_score", "low_face_score", "low_face_score"]
    assert result["steps"]["face_score"] == {"dropped": 3}


def chain_directions(rng, n, step_cos):
    """n unit vectors along a great circle: consecutive ones at `step_cos`, far ones nearly orthogonal."""
    e1, e2 = people(rng, 2, DIM)
    e2 = normalise((e2 - e2.dot(e1) * e1)[None])[0]
    step = np.arccos(step_cos)
    return [np.cos(k * step) * e1 + np.sin(k * step) * e2 for k in range(n)]


def identity_state(rng, centers, sizes, cos=0.95, names=None):
    rows = []
    for k, (c, n) in enumerate(zip(centers, sizes)):
        name = names[k] if names else f"n{k:02d}"
        rows += [(name, f"{name}_{i}", f) for i, f in enumerate(person_photos(rng, c, n, cos=cos))]
    state = make_state(rows)
    cluster(state)
    return state


@pytest.mark.parametrize("length", [3, 12])
def test_merge_is_transitive_for_chains_of_any_length(length):
    rng = np.random.default_rng(5)
    # a-b and b-c are above 0.7, a-c is not (0.28): the reference's one-hop remap left them apart.
    centers = chain_directions(rng, length, 0.8)
    assert centers[0].dot(centers[2]) < 0.3
    state = identity_state(rng, centers, [6] * length)
    report = merge_identities(state, OFFICIAL.merge, OFFICIAL.ambiguous, block=4, weighting="norm")
    assert report["identities_merged_away"] == length - 1
    assert len(np.unique(state.ident[state.kept()])) == 1
    assert state.kept().all()


def test_merge_keeps_the_id_of_the_largest_member():
    rng = np.random.default_rng(6)
    a = people(rng, 1, DIM)[0]
    state = identity_state(rng, [a, at_cosine(rng, a, 0.9)], [3, 7], names=["alias", "real"])
    merge_identities(state, OFFICIAL.merge, OFFICIAL.ambiguous, block=64, weighting="mean")
    assert {state.names[i] for i in state.ident} == {"real"}


def test_ambiguous_pair_drops_the_smaller_identity_after_merging():
    rng = np.random.default_rng(7)
    a = people(rng, 1, DIM)[0]
    b = at_cosine(rng, a, 0.65)  # ambiguous: 0.6 < cos <= 0.7
    other = people(rng, 1, DIM)[0]
    state = identity_state(rng, [a, b, other], [8, 5, 4], cos=0.97)
    report = merge_identities(state, OFFICIAL.merge, OFFICIAL.ambiguous, block=64, weighting="norm")
    assert report["ambiguous_identities_dropped"] == 1 and report["identities_merged_away"] == 0
    assert set(state.reason[8:13]) == {"ambiguous_identity"}
    assert state.kept()[:8].all() and state.kept()[13:].all()


def test_near_duplicates_keep_the_best_copy_without_a_size_cap():
    rng = np.random.default_rng(8)
    a = people(rng, 1, DIM)[0]
    base = list(person_photos(rng, a, 5, cos=0.85))
    copy0 = normalise((base[0] + 0.02 * rng.standard_normal(DIM) / np.sqrt(DIM))[None])[0]
    rows = [("x", f"p{i}", f) for i, f in enumerate(base)] + [("x", "copy0", copy0)]
    state = make_state(rows, scores=[0.97, 0.99, 0.99, 0.99, 0.99, 0.99])
    cluster(state)
    assert drop_near_duplicates(state, OFFICIAL.duplicate) == {"near_duplicates": 1}
    # The copy has the better face score: it stays, the original goes.
    assert state.reason[0] == "near_duplicate" and state.kept()[5]


def test_dedup_blocks_give_the_same_answer_as_one_block():
    rng = np.random.default_rng(9)
    a = people(rng, 1, DIM)[0]
    f = person_photos(rng, a, 40, cos=0.9)
    f = np.concatenate([f, photos(rng, f[::3], 0.05)])  # planted copies of every third photo
    f = f[rng.permutation(len(f))]
    whole = dedup_rows(f, 0.9, block=10_000)
    assert np.array_equal(whole, dedup_rows(f, 0.9, block=7))
    kept = f[whole]
    sims = kept @ kept.T
    assert (sims[np.triu_indices(len(kept), 1)] <= 0.9).all()
    assert whole.sum() >= 40 - 5  # the copies go, almost all originals stay


def test_val_overlap_removes_the_planted_identity_and_reports_per_set():
    rng = np.random.default_rng(10)
    ids = people(rng, 3, DIM)
    state = identity_state(rng, ids, [4, 4, 4], cos=0.95)
    lfw = ValSet("lfw", "lfw.parquet", "kprpe", {}, ["img0", "img1"],
                 np.stack([photos(rng, ids[1:2], 0.3)[0], people(rng, 1, DIM)[0]]))
    agedb = ValSet("agedb_30", "agedb.parquet", "kprpe", {}, ["x"], people(rng, 1, DIM))
    report = remove_val_overlap(state, [lfw, agedb], OFFICIAL.val_overlap, OFFICIAL.val_overlap_image, block=2,
                                weighting="norm")
    assert report["lfw"]["identities"] == 1 and report["lfw"]["images"] == 4
    assert report["agedb_30"]["identities"] == 0
    assert set(state.reason[4:8]) == {"val_overlap:lfw"}
    assert state.kept()[:4].all() and state.kept()[8:].all()


def test_val_overlap_center_rule_with_and_without_image_counts():
    """With image counts, a center matches above `val_overlap + CENTER_MARGIN`; a file without them gets the
    official rule (above `val_overlap`)."""
    from pipeline.clean.overlap import CENTER_MARGIN

    rng = np.random.default_rng(12)
    ids = people(rng, 2, DIM)
    results = {}
    for n, cos in ((3, OFFICIAL.val_overlap + CENTER_MARGIN / 2), (3, OFFICIAL.val_overlap + 2 * CENTER_MARGIN),
                   (None, OFFICIAL.val_overlap + CENTER_MARGIN / 2)):
        state = identity_state(rng, ids, [4, 4], cos=0.999)
        _, centers, _ = identity_centers(state, "norm")
        vs = ValSet("s", "s.parquet", "kprpe", {}, ["x"], at_cosine(rng, centers[0], cos)[None].astype(np.float32),
                    None if n is None else np.array([n]))
        results[(n, round(cos, 4))] = remove_val_overlap(state, [vs], OFFICIAL.val_overlap, OFFICIAL.val_overlap_image,
                                                         block=2, weighting="norm")["s"]["identities"]
    assert list(results.values()) == [0, 1, 1]


def test_val_overlap_one_image_center_judged_against_the_identitys_photos():
    """A one-image center below the center threshold is the identity's person when it is as close to the
    identity's photos as they are to each other (another photo of the person: removed), not when it is
    only near the identity's center (a look-alike at a similar center cosine: kept)."""
    from pipeline.clean.overlap import CANDIDATE_FLOOR, CENTER_MARGIN, member_ratio

    rng = np.random.default_rng(13)
    person = people(rng, 1, DIM)[0]
    own = person_photos(rng, person, 12, cos=0.8)  # photo pairs at ~0.64
    state = make_state([("n00", f"n00_{i}", f) for i, f in enumerate(own)])
    cluster(state)
    _, centers, _ = identity_centers(state, "norm")
    photo = at_cosine(rng, person, 0.73)  # one more photo of the person, of another age
    lookalike = at_cosine(rng, person, 0.645)  # another person
    c_photo, c_look = float(centers[0] @ photo), float(centers[0] @ lookalike)
    low, high = OFFICIAL.val_overlap - CANDIDATE_FLOOR, OFFICIAL.val_overlap + CENTER_MARGIN
    assert low < c_look < c_photo < high  # both below the center threshold, above the floor
    ratios = member_ratio(normalise(own), np.stack([photo, lookalike]).astype(np.float32))
    assert ratios[0] > OFFICIAL.val_overlap_image > ratios[1]
    removed = {}
    for what, vec in (("photo", photo), ("lookalike", lookalike)):
        st = make_state([("n00", f"n00_{i}", f) for i, f in enumerate(own)])
        cluster(st)
        vs = ValSet("lfw", "lfw.parquet", "kprpe", {}, ["img0"], vec[None].astype(np.float32), np.array([1]))
        removed[what] = remove_val_overlap(st, [vs], OFFICIAL.val_overlap, OFFICIAL.val_overlap_image, block=2,
                                           weighting="norm")["lfw"]
    assert removed["photo"]["identities"] == 1 and removed["lookalike"]["identities"] == 0
    # The same vector as a folder center (3 images) is judged on the center cosine alone: kept.
    st = make_state([("n00", f"n00_{i}", f) for i, f in enumerate(own)])
    cluster(st)
    vs = ValSet("agedb_30", "a.parquet", "kprpe", {}, ["x"], photo[None].astype(np.float32), np.array([3]))
    report = remove_val_overlap(st, [vs], OFFICIAL.val_overlap, OFFICIAL.val_overlap_image, block=2, weighting="norm")
    assert report["agedb_30"]["identities"] == 0


def test_too_few_images_and_funnel():
    rng = np.random.default_rng(11)
    a, b = people(rng, 2, DIM)
    rows = [("a", f"a{i}", f) for i, f in enumerate(person_photos(rng, a, 3))]
    rows += [("b", f"b{i}", f) for i, f in enumerate(person_photos(rng, b, 2))]
    state = make_state(rows, scores=[0.99] * 4 + [0.5])
    result = clean_selection(state, CleanConfig(), OFFICIAL, [])
    assert state.reason[3] == "too_few_images" and state.reason[4] == "low_face_score"
    steps = [(r["step"], r["identities"], r["images"]) for r in result["funnel"]]
    assert steps == [("input", 2, 5), ("copies", 2, 5), ("cluster", 2, 5), ("face_score", 2, 4), ("merge", 2, 4),
                     ("near_duplicates", 2, 4), ("val_overlap", 2, 4), ("min_images", 1, 3)]


def test_val_overlap_image_threshold_is_the_users_trade_off():
    """`val_overlap_image` moves the one-image rule: above an image's member ratio it is kept, below it
    removed, and the stage reads it from the config per embedder."""
    from pipeline.clean.overlap import member_ratio
    from pipeline.clean.select import resolve_thresholds

    rng = np.random.default_rng(13)
    person = people(rng, 1, DIM)[0]
    own = person_photos(rng, person, 12, cos=0.8)
    photo, lookalike = at_cosine(rng, person, 0.73), at_cosine(rng, person, 0.645)
    r_photo, r_look = member_ratio(normalise(own), np.stack([photo, lookalike]).astype(np.float32))

    def removed(vec: np.ndarray, image_ratio: float) -> int:
        st = make_state([("n00", f"n00_{i}", f) for i, f in enumerate(own)])
        cluster(st)
        vs = ValSet("lfw", "lfw.parquet", "kprpe", {}, ["img0"], vec[None].astype(np.float32), np.array([1]))
        return remove_val_overlap(st, [vs], OFFICIAL.val_overlap, image_ratio, block=2,
                                  weighting="norm")["lfw"]["identities"]

    assert removed(photo, r_photo - 0.01) == 1 and removed(photo, r_photo + 0.01) == 0
    assert removed(lookalike, r_look - 0.01) == 1 and removed(lookalike, r_look + 0.01) == 0
    cfg = CleanConfig.model_validate({"thresholds": {"kprpe": {"val_overlap_image": 0.8}}})
    assert resolve_thresholds(cfg, "kprpe").val_overlap_image == 0.8
    assert resolve_thresholds(CleanConfig(), "kprpe").val_overlap_image == OFFICIAL.val_overlap_image
    with pytest.raises(ValueError):
        EmbedderThresholds(val_overlap_image=0)


def test_partial_threshold_override_keeps_the_embedders_own_values():
    """A config that sets a few of dlib's thresholds keeps dlib's registered values for the rest (dlib's
    cosine scale), not the cosine embedders' defaults, also after the config crosses a process (pickle)."""
    import pickle

    from pipeline.clean.select import resolve_thresholds
    from pipeline.faces.embedders import EMBEDDERS

    dlib = EMBEDDERS.get("dlib").thresholds
    cfg = CleanConfig.model_validate({"thresholds": {"dlib": {"dbscan_eps": 0.07, "dbscan_min_samples": 1}}})
    for c in (cfg, pickle.loads(pickle.dumps(cfg))):
        thr = resolve_thresholds(c, "dlib")
        assert thr.dbscan_eps == 0.07 and thr.dbscan_min_samples == 1
        assert thr.val_overlap_image == dlib["val_overlap_image"] != OFFICIAL.val_overlap_image
        assert thr.merge == dlib["merge"] and thr.val_overlap == dlib["val_overlap"]
    with pytest.raises(ValueError):  # the merged values are validated together
        resolve_thresholds(CleanConfig.model_validate({"thresholds": {"dlib": {"merge": 0.8}}}), "dlib")
