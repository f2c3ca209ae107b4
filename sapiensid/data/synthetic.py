"""Generated identities in the WebBody shard format, for tests, benchmarks and smoke runs without real data.

Each identity is a distinct stick/blob figure: its own clothing colours, shirt pattern (solid, stripes, checks,
dots), head shape, body proportions and accessory. Every image of it draws a new pose (arm/leg angles, lean),
scale, position, partial crop and a random cluttered background, so recognising the identity needs the figure,
not the image statistics. Images are 384x384, the figure's region centred on white padding, with the 17 COCO
keypoints (pixel coords, visibility) and 5 face landmarks written like the bundle stage does.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from schemas.sample import IMAGE_SIZE, SAMPLE_VERSION, validate_sample

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots")


@dataclass(frozen=True)
class Identity:
    index: int
    shirt: tuple[int, int, int]
    shirt2: tuple[int, int, int]
    pants: tuple[int, int, int]
    skin: tuple[int, int, int]
    pattern: str
    period: int
    head_square: bool
    width: float  # torso width relative to height
    legs: float  # leg length share
    hat: bool

    @staticmethod
    def make(index: int, seed: int = 0) -> Identity:
        rng = np.random.default_rng((seed, index, 17))

        def colour() -> tuple[int, int, int]:
            return tuple(int(c) for c in rng.integers(20, 230, size=3))

        return Identity(
            index=index,
            shirt=colour(),
            shirt2=colour(),
            pants=colour(),
            skin=tuple(int(c) for c in np.array([200, 160, 130]) * rng.uniform(0.5, 1.1)),
            pattern=PATTERNS[index % len(PATTERNS)],
            period=int(rng.integers(8, 20)),
            head_square=bool(rng.random() < 0.5),
            width=float(rng.uniform(0.22, 0.38)),
            legs=float(rng.uniform(0.42, 0.55)),
            hat=bool(rng.random() < 0.4),
        )


def _pattern_fill(canvas: np.ndarray, mask: np.ndarray, ident: Identity) -> None:
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    p = ident.period
    if ident.pattern == "hstripes":
        alt = (yy // p) % 2 == 1
    elif ident.pattern == "vstripes":
        alt = (xx // p) % 2 == 1
    elif ident.pattern == "checks":
        alt = ((yy // p) + (xx // p)) % 2 == 1
    elif ident.pattern == "dots":
        alt = ((yy % p - p / 2) ** 2 + (xx % p - p / 2) ** 2) < (p / 4) ** 2
    else:
        alt = np.zeros_like(mask)
    canvas[mask & ~alt] = ident.shirt
    canvas[mask & alt] = ident.shirt2


def render(ident: Identity, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """One 384x384 image of `ident` and its record fields (keypoints, boxes, landmarks)."""
    S = IMAGE_SIZE
    height = rng.uniform(0.65, 0.95) * S  # figure height in pixels
    cx = S / 2 + rng.uniform(-0.08, 0.08) * S
    top = (S - height) / 2 + rng.uniform(-0.04, 0.04) * S
    head_r = height * 0.075
    neck = np.array([cx, top + 2.2 * head_r])
    torso_h = height * (1 - ident.legs) - 2.2 * head_r
    half_w = height * ident.width / 2
    lean = rng.uniform(-0.1, 0.1)
    hip_c = neck + np.array([lean * torso_h, torso_h])
    leg_len = height * ident.legs
    arm_len = torso_h * 1.1

    def limb(start: np.ndarray, angle: float, length: float) -> np.ndarray:
        return start + length * np.array([np.sin(angle), np.cos(angle)])

    # COCO keypoints; the person faces the camera, so their left is at larger x.
    l_sho, r_sho = neck + [half_w, 0.1 * head_r], neck + [-half_w, 0.1 * head_r]
    l_hip, r_hip = hip_c + [half_w * 0.7, 0], hip_c + [-half_w * 0.7, 0]
    l_elb = limb(l_sho, rng.uniform(-0.3, 1.2), arm_len / 2)
    r_elb = limb(r_sho, -rng.uniform(-0.3, 1.2), arm_len / 2)
    l_wri = limb(l_elb, rng.uniform(-0.5, 1.5), arm_len / 2)
    r_wri = limb(r_elb, -rng.uniform(-0.5, 1.5), arm_len / 2)
    l_kne = limb(l_hip, rng.uniform(-0.05, 0.45), leg_len / 2)
    r_kne = limb(r_hip, -rng.uniform(-0.05, 0.45), leg_len / 2)
    l_ank = limb(l_kne, rng.uniform(-0.3, 0.3), leg_len / 2)
    r_ank = limb(r_kne, rng.uniform(-0.3, 0.3), leg_len / 2)
    head_c = neck - [0, 1.2 * head_r]
    nose = head_c + [0, 0.15 * head_r]
    l_eye, r_eye = head_c + [0.35 * head_r, -0.2 * head_r], head_c + [-0.35 * head_r, -0.2 * head_r]
    l_ear, r_ear = head_c + [0.95 * head_r, 0], head_c + [-0.95 * head_r, 0]
    l_mouth, r_mouth = head_c + [0.3 * head_r, 0.5 * head_r], head_c + [-0.3 * head_r, 0.5 * head_r]
    kps = [nose, l_eye, r_eye, l_ear, r_ear, l_sho, r_sho, l_elb, r_elb, l_wri, r_wri, l_hip, r_hip,
           l_kne, r_kne, l_ank, r_ank]

    pts = np.array(kps)
    x1, y1 = pts.min(axis=0) - head_r * 1.3
    x2, y2 = pts.max(axis=0) + head_r * 1.3
    # Partial views: sometimes only the upper body is in the photo.
    if rng.random() < 0.25:
        y2 = hip_c[1] + rng.uniform(0.0, 0.6) * leg_len
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(S), x2), min(float(S), y2)
    box = [int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))]

    img = np.full((S, S, 3), 255, np.uint8)
    bx1, by1, bx2, by2 = box
    # Cluttered background: a random colour, gradient and rectangles; never pure white.
    base = rng.integers(60, 225, size=3)
    grad = np.linspace(0, 1, by2 - by1)[:, None, None] * rng.integers(-40, 40, size=3)
    region = np.clip(base + grad + rng.normal(0, 6, (by2 - by1, bx2 - bx1, 3)), 0, 240).astype(np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        rx, ry = rng.integers(0, max(1, bx2 - bx1)), rng.integers(0, max(1, by2 - by1))
        rw, rh = rng.integers(10, 80, size=2)
        col = tuple(int(c) for c in rng.integers(0, 230, size=3))
        cv2.rectangle(region, (int(rx), int(ry)), (int(rx + rw), int(ry + rh)), col, -1)
    img[by1:by2, bx1:bx2] = region

    figure = img[by1:by2, bx1:bx2]
    off = np.array([bx1, by1], dtype=np.float64)

    def P(p: np.ndarray) -> tuple[int, int]:
        q = p - off
        return int(round(q[0])), int(round(q[1]))

    thick = max(3, int(head_r * 0.55))
    for a, b, col in [
        (l_hip, l_kne, ident.pants), (l_kne, l_ank, ident.pants), (r_hip, r_kne, ident.pants),
        (r_kne, r_ank, ident.pants), (l_sho, l_elb, ident.shirt), (r_sho, r_elb, ident.shirt),
        (l_elb, l_wri, ident.skin), (r_elb, r_wri, ident.skin),
    ]:
        cv2.line(figure, P(a), P(b), col, thick, cv2.LINE_AA)
    torso = np.array([P(l_sho), P(r_sho), P(r_hip), P(l_hip)], np.int32)
    tmask = np.zeros(figure.shape[:2], np.uint8)
    cv2.fillPoly(tmask, [torso], 1)
    _pattern_fill(figure, tmask.astype(bool), ident)
    hc = P(head_c)
    r = int(head_r)
    if ident.head_square:
        cv2.rectangle(figure, (hc[0] - r, hc[1] - r), (hc[0] + r, hc[1] + r), ident.skin, -1)
    else:
        cv2.circle(figure, hc, r, ident.skin, -1, cv2.LINE_AA)
    if ident.hat:
        cv2.rectangle(figure, (hc[0] - r, hc[1] - int(1.6 * r)), (hc[0] + r, hc[1] - int(0.7 * r)), ident.shirt2, -1)
    for p in (l_eye, r_eye):
        cv2.circle(figure, P(p), max(1, r // 6), (20, 20, 20), -1)

    keypoints = []
    for p in kps:
        inside = bx1 <= p[0] < bx2 and by1 <= p[1] < by2
        keypoints.append([float(p[0]), float(p[1]), 0.95 if inside else 0.1])
    face_ok = all(bx1 <= p[0] < bx2 and by1 <= p[1] < by2 for p in (l_eye, r_eye, nose, l_mouth, r_mouth))
    fields = {
        "keypoints": keypoints,
        "content_box": [float(v) for v in box],
        "body_box": [float(v) for v in box],
        "face_box": [float(head_c[0] - r), float(head_c[1] - r), float(head_c[0] + r), float(head_c[1] + r)]
        if face_ok else None,
        "face_landmarks": [[float(p[0]), float(p[1])] for p in (l_eye, r_eye, nose, l_mouth, r_mouth)]
        if face_ok else None,
        "face_score": 0.99 if face_ok else None,
    }
    return img, fields


def sample_record(key: str, label: int, split: str, img: np.ndarray, fields: dict) -> tuple[bytes, dict]:
    """JPEG bytes and a schema-valid record for one generated image."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("JPEG encoding failed")
    jpg = buf.tobytes()
    meta = {
        "key": key,
        "class_id": int(label),
        "identity": f"synthetic-{label:05d}",
        "name": f"Synthetic Person {label}",
        "split": split,
        "url": f"synthetic://{key}",
        "image_sha256": hashlib.sha256(jpg).hexdigest(),
        "sample_id": key,
        "detection_index": 0,
        "person_score": 0.9,
        "pipeline_version": "synthetic",
        "config_hash": "synthetic",
        "version": SAMPLE_VERSION,
        **fields,
    }
    return jpg, validate_sample(meta, where=key)


def write_shards(
    out_dir: str | Path,
    n_identities: int,
    per_identity: int,
    split: str = "train",
    samples_per_shard: int = 200,
    seed: int = 0,
    image_seed: int = 0,
    label_offset: int = 0,
) -> list[str]:
    """Write `webbody-{split}-{shard:06d}.tar` shards (+ index.parquet rows returned by `index_rows`) of
    generated identities; images of one identity are spread over shards in shuffled order. `image_seed` picks
    the poses, so several splits of the same identities (train vs held-out) never share an image."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, image_seed, 99))
    idents = [Identity.make(i + label_offset, seed) for i in range(n_identities)]
    order = [(i, k) for i in range(n_identities) for k in range(per_identity)]
    order = [order[j] for j in rng.permutation(len(order))]
    paths: list[str] = []
    writer = None
    rows = []
    for n, (i, k) in enumerate(order):
        if n % samples_per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(str(out / f"webbody-{split}-{len(paths):06d}.tar"))
            writer = wds.TarWriter(paths[-1])
        label = i + label_offset
        key = f"{split}{image_seed}_{label:05d}_{k:04d}"
        img, fields = render(idents[i], np.random.default_rng((seed, image_seed, label, k)))
        jpg, meta = sample_record(key, label, split, img, fields)
        assert writer is not None
        writer.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})
        rows.append({"key": key, "shard": Path(paths[-1]).name, "class_id": label, "split": split,
                     "identity": meta["identity"]})
    if writer is not None:
        writer.close()
    _write_index(out, rows)
    return paths


def _write_index(out: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = out / "index.parquet"
    table = pa.Table.from_pylist(rows)
    if index.exists():
        table = pa.concat_tables([pq.read_table(index), table])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    index.write_bytes(buf.getvalue())
