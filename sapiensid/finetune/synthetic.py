"""A generated multi-domain set in the generic layout, for tests and benchmarks without real cross-spectral data.

Identities are rendered exactly as :mod:`sapiensid.data.synthetic` does (own clothes colours, pattern, head,
proportions, hat; a new pose, scale, crop and cluttered background per image). A *domain* is a strong appearance
change applied inside the figure's box (the white padding stays white, as a real crop's would):

* ``vis``: unchanged;
* ``ir``: greyscale with inverted intensity, mild blur and sensor noise (thermal-like polarity);
* ``swir``: greyscale with a remapped (gamma 0.5) intensity and mild blur;
* ``mwir``: inverted greyscale with a stronger blur and noise;
* ``lwir``: inverted, contrast-compressed greyscale at a 4x lower resolution with noise.

Colour, the strongest cue of a visible-light model on these figures, is gone in every non-visible domain: a model
has to learn pattern, shape and proportions to match across domains. Written as
``ROOT/<domain>/<identity>/<k>.jpg`` plus ``ROOT/keypoints.json`` (pixel keypoints of the written images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from sapiensid.data.synthetic import Identity, render
from sapiensid.finetune.data import write_keypoints

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _grey(region: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(region, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _finish(g: np.ndarray, rng: np.random.Generator, blur: float, noise: float, down: int) -> np.ndarray:
    if blur > 0:
        g = cv2.GaussianBlur(g, (0, 0), sigmaX=blur)
    if down > 1:
        h, w = g.shape
        small = cv2.resize(g, (max(1, w // down), max(1, h // down)), interpolation=cv2.INTER_AREA)
        g = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if noise > 0:
        g = g + rng.normal(0, noise, g.shape)
    # stay below pure white so the foreground rule still finds the figure
    return np.repeat(np.clip(g, 0, 245).astype(np.uint8)[..., None], 3, axis=2)


DOMAIN_TRANSFORMS: dict[str, Transform] = {
    "vis": lambda r, rng: r,
    "ir": lambda r, rng: _finish(255 - _grey(r), rng, 1.0, 6.0, 1),
    "swir": lambda r, rng: _finish(255 * (_grey(r) / 255) ** 0.5, rng, 0.8, 3.0, 1),
    "mwir": lambda r, rng: _finish(255 - _grey(r), rng, 2.5, 10.0, 1),
    "lwir": lambda r, rng: _finish(60 + 0.6 * (255 - _grey(r)), rng, 1.0, 10.0, 4),
}


def _keypoints22(fields: dict, scale: float) -> np.ndarray:
    out = np.full((22, 2), -1.0, np.float32)
    kps = np.asarray(fields["keypoints"], np.float32)
    vis = kps[:, 2] >= 0.5
    out[:17][vis] = kps[vis, :2] * scale
    if fields.get("face_landmarks") is not None:
        out[17:] = np.asarray(fields["face_landmarks"], np.float32) * scale
    return out


def write_multidomain(root: str | Path, identities: Sequence[int], per_domain: int,
                      domains: Sequence[str] = ("vis", "ir"), size: int = 128, seed: int = 0,
                      image_seed: int = 0) -> Path:
    """Write `per_domain` images of every identity (indices into the generator) in every domain."""
    unknown = [d for d in domains if d not in DOMAIN_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown synthetic domain(s) {unknown}; choose from {sorted(DOMAIN_TRANSFORMS)}")
    root = Path(root)
    points: dict[str, np.ndarray] = {}
    for di, d in enumerate(domains):
        for ident in identities:
            person = Identity.make(int(ident), seed)
            folder = root / d / f"id{int(ident):05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_domain):
                rng = np.random.default_rng((seed, image_seed, int(ident), di, k))
                img, fields = render(person, rng)
                x1, y1, x2, y2 = (int(v) for v in fields["content_box"])
                img[y1:y2, x1:x2] = DOMAIN_TRANSFORMS[d](img[y1:y2, x1:x2], rng)
                scale = size / img.shape[0]
                small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                path = folder / f"{k:03d}.jpg"
                cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
                points[path.relative_to(root).as_posix()] = _keypoints22(fields, scale)
    write_keypoints(root, points)
    return root
