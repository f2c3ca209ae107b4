"""Keypoint preprocessing for SapiensID: 22-point input -> kp19, ROI boxes, augmentation, h-flip.

Input layout (B, 22, 2), (x, y) in [0, 1] of the model input, -1 = missing:
0..16 COCO-17 body keypoints (0 nose, 1/2 L/R eye, 3/4 L/R ear, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
11/12 hips, 13/14 knees, 15/16 ankles), 17..21 the 5 face landmarks (L eye, R eye, nose, L mouth, R mouth).

kp19 (the model's order): face nose, face L eye, face R eye, L mouth, R mouth, body L ear, body R ear,
then body 5..16. A point counts as valid only if both coordinates differ from -1; a half-missing point
is canonicalised to (-1, -1) so every later stage agrees on validity (the reference was inconsistent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KP19_FROM_22 = [19, 17, 18, 20, 21, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
FACE5 = [0, 1, 2, 3, 4]  # kp19 indices of the face box points
UPPER_TORSO = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # face5 + ears + shoulders (kp19)
SHOULDERS = [7, 8]  # kp19 indices; the torso box needs at least one
BOX_PADDING = 0.3
# Left/right pairs of the 22-point input, swapped by a horizontal flip.
FLIP_PAIRS_22 = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18), (20, 21)]


def valid_mask(kps: torch.Tensor) -> torch.Tensor:
    """(..., K, 2) -> (..., K) bool: both coordinates present."""
    return (kps != -1).all(dim=-1)


def canonicalise_missing(kps: torch.Tensor) -> torch.Tensor:
    """Set both coordinates of any half-missing point to -1."""
    ok = valid_mask(kps)
    return torch.where(ok.unsqueeze(-1), kps, torch.full_like(kps, -1.0))


def to_kp19(ldmks22: torch.Tensor) -> torch.Tensor:
    """(B, 22, 2) -> (B, 19, 2) in kp19 order, missing points canonicalised."""
    if ldmks22.ndim != 3 or ldmks22.shape[1:] != (22, 2):
        raise ValueError(f"expected keypoints of shape (B, 22, 2), got {tuple(ldmks22.shape)}")
    return canonicalise_missing(ldmks22[:, KP19_FROM_22].float())


def face_boxes(kp19: torch.Tensor, padding: float = BOX_PADDING, min_points: int = 2) -> torch.Tensor:
    """Square face box from the 5 face points (B, 4) xyxy in [0,1]; -1 rows where < min_points valid.

    centre = midpoint of the valid extent, pulled halfway to the nose when the nose is valid;
    side = 2 * max distance centre -> valid point, times (1 + padding); corners clamped to [0, 1].
    """
    pts = kp19[:, FACE5]
    ok, lo, hi = _valid_extent(pts)
    centre = (lo + hi) / 2
    nose = pts[:, 0]
    nose_ok = ok[:, 0]
    centre = torch.where(nose_ok[:, None], (centre + nose) / 2, centre)
    dist = torch.linalg.vector_norm(pts - centre[:, None], dim=-1)
    dist = torch.where(ok, dist, torch.full_like(dist, -1.0)).amax(dim=1)
    return _square_box(centre, dist * 2, padding, ok.sum(dim=1) >= min_points)


def torso_boxes(kp19: torch.Tensor, padding: float = BOX_PADDING, min_points: int = 3) -> torch.Tensor:
    """Square upper-torso box from face5 + ears + shoulders (B, 4); -1 rows unless >= 3 valid and a shoulder.

    centre = midpoint of the valid extent; side = max(x extent, y extent) * (1 + padding); clamped.
    """
    pts = kp19[:, UPPER_TORSO]
    ok, lo, hi = _valid_extent(pts)
    usable = (ok.sum(dim=1) >= min_points) & ok[:, SHOULDERS].any(dim=1)
    return _square_box((lo + hi) / 2, (hi - lo).amax(dim=1), padding, usable)


def _valid_extent(pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K, 2) points -> (valid (B, K), lowest (B, 2) and highest (B, 2) valid coordinates; +-inf if none)."""
    ok = valid_mask(pts)
    inf = torch.tensor(float("inf"), dtype=pts.dtype, device=pts.device)
    lo = torch.where(ok[..., None], pts, inf).amin(dim=1)
    hi = torch.where(ok[..., None], pts, -inf).amax(dim=1)
    return ok, lo, hi


def _square_box(centre: torch.Tensor, side: torch.Tensor, padding: float, usable: torch.Tensor) -> torch.Tensor:
    """(B, 2) centres and (B,) sides -> (B, 4) xyxy squares grown by `padding`, clamped to [0, 1]; -1 rows
    where not `usable`."""
    half = side[:, None] * (1 + padding) / 2
    box = torch.cat([(centre - half).clamp(min=0), (centre + half).clamp(max=1)], dim=1)
    return torch.where(usable[:, None], box, torch.full_like(box, -1.0))


def box_valid(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4) -> (B,) bool: a usable box (not the -1 sentinel and with positive area)."""
    return (boxes >= 0).all(dim=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


@dataclass(frozen=True)
class KeypointAugConfig:
    """Training-time augmentation (paper's base.yaml values)."""

    drop_point_prob: float = 0.05  # each of the 19 points, per sample
    drop_part_prob: float = 0.05  # all face5 or all upper-torso points, per sample (50/50)
    box_shift: float = 0.05  # centre shift U(-s, s) * box size, per axis
    box_scale: float = 0.05  # size scale 1 + U(-s, s), per axis
    box_drop_prob: float = 0.05  # fraction of samples losing face / torso / both boxes (0.4/0.4/0.2)


def augment_keypoints(kp19: torch.Tensor, cfg: KeypointAugConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random point drops and part drops. Part drops are drawn per sample (the reference drew one
    choice for the whole batch, which correlates augmentation across a batch)."""
    b = kp19.shape[0]
    dev = kp19.device
    out = kp19.clone()
    if cfg.drop_point_prob > 0:
        drop = torch.rand(b, kp19.shape[1], generator=gen, device=dev) < cfg.drop_point_prob
        out[drop] = -1.0
    if cfg.drop_part_prob > 0:
        part = torch.rand(b, generator=gen, device=dev) < cfg.drop_part_prob
        face = torch.rand(b, generator=gen, device=dev) < 0.5
        rows_face = torch.nonzero(part & face).flatten()
        rows_body = torch.nonzero(part & ~face).flatten()
        out[rows_face[:, None], torch.tensor(FACE5, device=dev)[None, :]] = -1.0
        out[rows_body[:, None], torch.tensor(UPPER_TORSO, device=dev)[None, :]] = -1.0
    return out


def augment_boxes(
    face: torch.Tensor, torso: torch.Tensor, cfg: KeypointAugConfig, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter valid boxes (shift, per-axis scale, clamp) and drop boxes of a few samples."""

    def jitter(boxes: torch.Tensor) -> torch.Tensor:
        b = boxes.shape[0]
        ok = box_valid(boxes)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        size = boxes[:, 2:] - boxes[:, :2]
        shift = (torch.rand(b, 2, generator=gen, device=boxes.device) * 2 - 1) * cfg.box_shift * size
        scale = 1 + (torch.rand(b, 2, generator=gen, device=boxes.device) * 2 - 1) * cfg.box_scale
        c2 = centre + shift
        s2 = size * scale
        new = torch.cat([c2 - s2 / 2, c2 + s2 / 2], dim=1).clamp(0, 1)
        return torch.where(ok[:, None], new, boxes)

    if cfg.box_shift > 0 or cfg.box_scale > 0:
        face, torso = jitter(face), jitter(torso)
    n_drop = int(face.shape[0] * cfg.box_drop_prob)
    if n_drop > 0:
        idx = torch.randperm(face.shape[0], generator=gen, device=face.device)[:n_drop]
        kind = torch.rand(n_drop, generator=gen, device=face.device)
        face, torso = face.clone(), torso.clone()
        face[idx[(kind < 0.4) | (kind >= 0.8)]] = -1.0
        torso[idx[kind >= 0.4]] = -1.0
    return face, torso


def preprocess_keypoints(
    ldmks22: torch.Tensor,
    training: bool = False,
    aug: KeypointAugConfig | None = None,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """22-point input -> (kp19, face boxes, torso boxes). Augmentation only when ``training``."""
    kp19 = to_kp19(ldmks22)
    aug = aug or KeypointAugConfig()
    if training:
        kp19 = augment_keypoints(kp19, aug, gen)
    face = face_boxes(kp19)
    torso = torso_boxes(kp19)
    if training:
        face, torso = augment_boxes(face, torso, aug, gen)
    return kp19, face, torso


def hflip_keypoints22(ldmks22: torch.Tensor) -> torch.Tensor:
    """Mirror x (x -> 1 - x) of valid points and swap left/right pairs so "left" keeps its meaning."""
    ok = valid_mask(ldmks22)
    flipped = ldmks22.clone()
    flipped[..., 0] = torch.where(ok, 1.0 - ldmks22[..., 0], ldmks22[..., 0])
    flipped = torch.where(ok.unsqueeze(-1), flipped, torch.full_like(flipped, -1.0))
    perm = list(range(ldmks22.shape[1]))
    for a, b in FLIP_PAIRS_22:
        perm[a], perm[b] = b, a
    return flipped[:, perm]
