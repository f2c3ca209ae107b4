"""Step 0: copies of one web photo are one photo (before clustering counts photos).

The web mirrors, re-encodes, resizes and crops photos all the time; a name whose results hold the same photo
three times must count it once, or the copies inflate a cluster and decide which person the name is.

What is hashed: the face's neighbourhood, not the whole image. A perceptual hash of the whole downloaded image
does not survive a crop (measured on the asset photos with `imagehash.phash`: a 10 % crop moves the hash 12-22
bits, while different photos start at 20 bits), but a crop that keeps a face keeps the face's neighbourhood.
So every faces row gets the `imagehash.phash` of a square patch around its face box (`PATCH_SCALE` x the
box side, white outside), cut from the persons stage's body crop (the pixels of the downloaded image, already
decoded once per row there), plus the phash of the mirrored patch. Two faces rows of one name in different
photos are copies when the hash distance (either orientation) is at most `max_distance` bits AND their
features are as similar as the name's clustering demands (a hash collision between two people cannot
collapse them). Copies of a copy are copies (connected components of those pairs, scipy).

What happens: rows joined by copy pairs form copy groups, and one row of each group stays: the one in the
group's canonical photo (photos joined by any copy pair; the canonical one has the most detections, since a
crop holds a subset of the people, then the higher summed face score, then the smaller person_id), else the
best row (face score, then person_id). The others are dropped as `near_duplicate`, naming the row they copy
(`duplicate_of`). A row without a copy stays and counts as its own photo: a collage that reuses one face
next to a new photo of someone else is not a copy of that someone. A copy under two different names is not
touched here: it stays for the cross-identity merge.
"""

from __future__ import annotations

import io
import logging

import imagehash
import numpy as np
import scipy.sparse as sp
from PIL import Image, ImageOps
from scipy.sparse.csgraph import connected_components

from pipeline.clean.state import CleanState, normalise
from pipeline.shards import DatasetDir

log = logging.getLogger(__name__)

PATCH_SCALE = 2.0  # patch side / face box side: the face plus hair, ears and a band of background
BLOCK = 1024  # rows per block of a name's pair search
ORB_FEATURES = 1000  # ORB keypoints per body crop (the local-feature copy check)
ORB_SIDE = 400  # crops are matched at most this many pixels on their longer side
MIN_INLIERS = 40  # keypoint matches one similarity transform explains: a copy (see `_Keypoints`)
NO_HASH = np.uint64(0)  # rows without a hash (no persons row, undecodable crop) never match anything
_POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _as_int(h: imagehash.ImageHash) -> int:
    bits = np.asarray(h.hash, dtype=np.uint8).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def patch_hashes(crop: bytes, face_box: list[float]) -> tuple[int, int] | None:
    """(phash, phash of the mirrored patch) of the square around `face_box` in the encoded body crop."""
    try:
        im = Image.open(io.BytesIO(crop))
        im = im.convert("L")
    except Exception:  # noqa: BLE001 - any undecodable crop: no hash, the row just never matches a copy
        return None
    x1, y1, x2, y2 = face_box
    side = PATCH_SCALE * max(x2 - x1, y2 - y1, 1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    canvas = Image.new("L", (box[2] - box[0], box[3] - box[1]), 255)
    canvas.paste(im, (-box[0], -box[1]))
    h = _as_int(imagehash.phash(canvas))
    hf = _as_int(imagehash.phash(ImageOps.mirror(canvas)))
    # 0 is the "no hash" value; a real all-zero hash is astronomically rare and only loses that match.
    return (h or 1), (hf or 1)


def load_patch_hashes(persons: DatasetDir, shard_ids: list[str], person_ids: list[list[str]],
                      face_boxes: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, int, list]:
    """Hashes of every faces row, shard by shard (persons shards share the faces shard ids).

    Returns (hash, mirrored hash, rows without a hash, each row's encoded body crop or None).
    """
    out_h, out_f, missing = [], [], 0
    out_crops: list = []
    for sid, pids, boxes in zip(shard_ids, person_ids, face_boxes):
        h = np.zeros(len(pids), dtype=np.uint64)
        f = np.zeros(len(pids), dtype=np.uint64)
        crops: dict[str, bytes] = {}
        if persons.is_done(sid):
            table = persons.read_shard(sid, columns=["person_id", "crop"])
            crops = dict(zip(table.column("person_id").to_pylist(), table.column("crop").to_pylist()))
        for k, (pid, box) in enumerate(zip(pids, boxes)):
            out_crops.append(crops.get(pid))
            got = patch_hashes(crops[pid], box) if pid in crops else None
            if got is None:
                missing += 1
                continue
            h[k], f[k] = got
        out_h.append(h)
        out_f.append(f)
    if missing:
        log.warning("clean: %d faces rows have no persons crop to hash; they are never taken for copies", missing)
    empty = np.zeros(0, dtype=np.uint64)
    return ((np.concatenate(out_h) if out_h else empty), (np.concatenate(out_f) if out_f else empty), missing,
            out_crops)


class _Keypoints:
    """ORB keypoints of body crops (and of their mirror images), computed once per row when first asked.

    The local-feature check of a copy: a mirrored, re-encoded, resized, cropped, slightly rotated or
    recoloured copy of a photo keeps hundreds of ORB keypoints that one similarity transform maps onto the
    other crop (RANSAC inliers); two different photos of one person keep a handful (measured on the demo's
    crops: copies 188-546 inliers, different photos <= 7). Perceptual hashes miss those copies once a
    rotation and a crop add up (the demo's Zidane variants: 18-26 bits, as far as different photos)."""

    def __init__(self, crops: np.ndarray | None):
        import cv2

        self.cv2, self.crops = cv2, crops
        self.orb = cv2.ORB_create(nfeatures=ORB_FEATURES)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self.cache: dict[tuple[int, bool], tuple] = {}

    def _features(self, row: int, mirror: bool) -> tuple:
        key = (row, mirror)
        if key not in self.cache:
            got: tuple = ((), None)
            crop = self.crops[row] if self.crops is not None else None
            if crop is not None:
                im = self.cv2.imdecode(np.frombuffer(crop, np.uint8), self.cv2.IMREAD_GRAYSCALE)
                if im is not None:
                    if mirror:
                        im = np.ascontiguousarray(im[:, ::-1])
                    scale = ORB_SIDE / max(im.shape)
                    if scale < 1:
                        im = self.cv2.resize(im, None, fx=scale, fy=scale, interpolation=self.cv2.INTER_AREA)
                    got = self.orb.detectAndCompute(im, None)
            self.cache[key] = got
        return self.cache[key]

    def _inliers(self, a: tuple, b: tuple) -> int:
        (ka, da), (kb, db) = a, b
        if da is None or db is None or len(ka) < 8 or len(kb) < 8:
            return 0
        good = [m[0] for m in self.matcher.knnMatch(da, db, k=2)
                if len(m) == 2 and m[0].distance < 0.75 * m[1].distance]
        if len(good) < 8:
            return len(good)
        pa = np.float32([ka[g.queryIdx].pt for g in good])
        pb = np.float32([kb[g.trainIdx].pt for g in good])
        _, mask = self.cv2.estimateAffinePartial2D(pa, pb, method=self.cv2.RANSAC, ransacReprojThreshold=5.0)
        return int(mask.sum()) if mask is not None else 0

    def same_photo(self, i: int, j: int) -> bool:
        """Whether the crops of rows i and j are one photo (directly or mirrored)."""
        first = self._features(i, False)
        return (self._inliers(first, self._features(j, False)) >= MIN_INLIERS
                or self._inliers(first, self._features(j, True)) >= MIN_INLIERS)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between two uint64 arrays (broadcasting)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)).copy(order="C")
    return _POP[x.reshape(-1).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.int64)


def _mutual_best(i: int, j: int, f: np.ndarray, photo: np.ndarray, sims_i: np.ndarray) -> bool:
    """Whether row j is row i's most similar face in j's photo and i is j's in i's (name-local rows)."""
    in_j = np.flatnonzero(photo == photo[j])
    if in_j[int(np.argmax(sims_i[in_j]))] != j:
        return False
    in_i = np.flatnonzero(photo == photo[i])
    return bool(in_i[int(np.argmax(f[in_i] @ f[j]))] == i)


def _name_copies(rows: np.ndarray, state: CleanState, max_distance: int, min_cos: float,
                 keypoints: _Keypoints | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For the rows of one name: the copied rows to drop, and the kept row each one copies."""
    h, hf = state.hash[rows], state.hash_flip[rows]
    photo = state.photo[rows]
    f = normalise(state.feats[rows])
    # Pairs in row blocks: memory is BLOCK x n per step, whatever the name's size (rows all have a hash).
    found_r, found_c = [], []
    orb_cand: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for a in range(0, len(rows), BLOCK):
        hb, fb, pb = h[a:a + BLOCK, None], f[a:a + BLOCK], photo[a:a + BLOCK, None]
        dist = np.minimum(hamming(hb, h[None, :]), hamming(hb, hf[None, :]))
        cand = (pb != photo[None, :]) & ((fb @ f.T) >= min_cos)
        match = cand & (dist <= max_distance)
        if keypoints is not None:
            # Pairs the hash does not take go to the local-feature check, each unordered pair once, when
            # they are each other's most similar face between their two photos (decided below per photo pair).
            sims = fb @ f.T
            rr, cc = np.nonzero(cand & ~match)
            for x, y in zip(rr.tolist(), cc.tolist()):
                if x + a < y and _mutual_best(x + a, y, f, photo, sims[x]):
                    orb_cand.setdefault((int(photo[x + a]), int(photo[y])), []).append((x + a, y))
        r, c = np.nonzero(match)
        found_r.append(r + a)
        found_c.append(c)
    if keypoints is not None:
        # Two photos are one photo when every face of each has its counterpart in the other and every
        # counterpart pair's body crops match (a collage pasting one face next to different people is not).
        n_in = {int(p): int(n) for p, n in zip(*np.unique(photo, return_counts=True))}
        for (pi, pj), pairs in sorted(orb_cand.items()):
            if n_in[pi] != n_in[pj] or len(pairs) != n_in[pi] or len({y for _, y in pairs}) != len(pairs):
                continue
            if all(keypoints.same_photo(int(rows[x]), int(rows[y])) for x, y in pairs):
                found_r.append(np.asarray([x for x, _ in pairs], dtype=np.int64))
                found_c.append(np.asarray([y for _, y in pairs], dtype=np.int64))
    r, c = np.concatenate(found_r), np.concatenate(found_c)
    empty = np.zeros(0, dtype=np.int64)
    if not len(r):
        return empty, empty
    # Photo groups: photos joined by any matched pair of their rows.
    codes, local = np.unique(photo, return_inverse=True)
    graph = sp.coo_matrix((np.ones(len(r)), (local[r], local[c])), shape=(len(codes), len(codes)))
    _, group = connected_components(graph, directed=False)
    n_det = np.bincount(local, minlength=len(codes))
    score = np.bincount(local, weights=state.face_score[rows].astype(np.float64), minlength=len(codes))
    first = np.full(len(codes), np.iinfo(np.int64).max)
    np.minimum.at(first, local, state.order_key[rows])
    canon = {}
    for p in np.lexsort((first, -score, -n_det)):  # best photo first
        canon.setdefault(int(group[p]), int(p))
    # Row groups: rows joined by matches; the kept row is the group's row in the canonical photo (best first),
    # else the best row (face score, then person_id order).
    rg = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), len(rows)))
    _, rgroup = connected_components(rg, directed=False)
    in_canon = np.array([canon[int(group[local[k]])] == local[k] for k in range(len(rows))])
    order = np.lexsort((state.order_key[rows], -state.face_score[rows], ~in_canon))
    keep_of: dict[int, int] = {}
    for k in order:
        keep_of.setdefault(int(rgroup[k]), int(k))
    dropped = [k for k in range(len(rows)) if keep_of[int(rgroup[k])] != k]
    kept_for = [keep_of[int(rgroup[k])] for k in dropped]
    return rows[np.asarray(dropped, dtype=np.int64)], rows[np.asarray(kept_for, dtype=np.int64)]


def collapse_copies(state: CleanState, max_distance: int, min_cos: float) -> dict:
    """Drop copies of a photo within each name as `near_duplicate` (see the module doc); returns the counts."""
    if state.hash is None:
        return {"skipped": "no persons input: copies of one photo were not looked for", "near_duplicate": 0,
                "photos_with_copies_dropped": 0}
    rows = np.flatnonzero(state.kept() & (state.hash != NO_HASH))
    rows = rows[np.lexsort((state.order_key[rows], state.label[rows]))]
    lab = state.label[rows]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(rows) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(rows)].astype(np.int64)
    drop, kept_for, photos = [], [], 0
    keypoints = _Keypoints(state.crops) if state.crops is not None else None
    for a, b in zip(starts, ends):
        name_rows = rows[a:b]
        if len(np.unique(state.photo[name_rows])) < 2:
            continue
        if keypoints is not None:
            keypoints.cache.clear()  # one name's keypoints at a time
        d, k = _name_copies(name_rows, state, max_distance, min_cos, keypoints)
        drop.append(d)
        kept_for.append(k)
        photos += len(np.unique(state.photo[d]))
    n = 0
    if drop:
        d, k = np.concatenate(drop), np.concatenate(kept_for)
        mask = np.zeros(state.n, dtype=bool)
        mask[d] = True
        n = state.drop(mask, "near_duplicate")
        state.copy_of[d] = k
    return {"near_duplicate": n, "photos_with_copies_dropped": photos}
