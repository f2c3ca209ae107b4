"""Retina Patch: exact single coverage of the foreground, token budget, graceful loss of ROIs."""

from __future__ import annotations

import torch

from sapiensid.config import SapiensIDConfig
from sapiensid.keypoints import face_boxes, to_kp19, torso_boxes
from sapiensid.model import SapiensID
from sapiensid.retina_patch import snap_rois, snap_to_grid

S = 96  # tiny preset input side


def _person_keypoints(batch: int) -> torch.Tensor:
    """Plausible 22-point layouts at different positions/scales (x, y in [0,1])."""
    base = torch.tensor(
        [[0.50, 0.20], [0.53, 0.18], [0.47, 0.18], [0.56, 0.20], [0.44, 0.20], [0.62, 0.32], [0.38, 0.32],
         [0.66, 0.45], [0.34, 0.45], [0.67, 0.57], [0.33, 0.57], [0.58, 0.60], [0.42, 0.60], [0.58, 0.77],
         [0.42, 0.77], [0.58, 0.93], [0.42, 0.93], [0.53, 0.185], [0.47, 0.185], [0.50, 0.21], [0.525, 0.235],
         [0.475, 0.235]]
    )
    out = []
    for i in range(batch):
        scale = 0.7 + 0.1 * i
        shift = torch.tensor([0.03 * i - 0.05, 0.02 * i])
        out.append(((base - 0.5) * scale + 0.5 + shift).clamp(0.01, 0.99))
    return torch.stack(out)


def _coverage(aux: dict, b: int, side: int) -> torch.Tensor:
    """(S, S) count of kept valid tokens whose ROI cell contains each pixel centre."""
    count = torch.zeros(S, S, dtype=torch.int64)
    centres = torch.arange(S, dtype=torch.float64) + 0.5
    rois = aux["rois"][b].double() * S
    for idx, ok in zip(aux["ids_keep"][b].tolist(), aux["kept_valid"][b].tolist()):
        if not ok:
            continue
        level, local = divmod(idx, side * side)
        r, c = divmod(local, side)
        x1, y1, x2, y2 = rois[level].tolist()
        cw, ch = (x2 - x1) / side, (y2 - y1) / side
        in_x = (centres >= x1 + c * cw) & (centres < x1 + (c + 1) * cw)
        in_y = (centres >= y1 + r * ch) & (centres < y1 + (r + 1) * ch)
        count += (in_y[:, None] & in_x[None, :]).long()
    return count


def test_foreground_covered_exactly_once():
    torch.manual_seed(0)
    model = SapiensID(SapiensIDConfig.preset("tiny")).eval()
    side = model.config.side
    b = 4
    images = torch.rand(b, 3, S, S) * 2 - 1
    kps = _person_keypoints(b)
    # cell-aligned foreground rectangles (white padding left/right of a portrait crop)
    fg = torch.zeros(b, S, S, dtype=torch.bool)
    cell = S // side
    for i in range(b):
        fg[i, :, cell * (1 + i % 2) : S - cell * (2 - i % 2)] = True
    with torch.no_grad():
        _, aux = model.net(images, fg, kps, return_aux=True)
    assert aux["roi_ok"].all()
    for i in range(b):
        cov = _coverage(aux, i, side)
        assert int(cov.max()) <= 1, "a pixel is represented by two levels"
        assert bool((cov[fg[i]] == 1).all()), "a foreground pixel is not represented"
        # background outside the torso/face ROIs is dropped (whole-image tokens need foreground)
        x1, y1, x2, y2 = (aux["rois"][i, 1] * S).tolist()
        centres = torch.arange(S) + 0.5
        in_torso = ((centres >= y1) & (centres < y2))[:, None] & ((centres >= x1) & (centres < x2))[None, :]
        assert int(cov[~fg[i] & ~in_torso].sum()) == 0
        # the finest level wins: face-box pixels are covered by face tokens only
        levels = aux["ids_keep"][i][aux["kept_valid"][i]] // (side * side)
        assert {0, 1, 2} <= set(levels.tolist())
    assert aux["kept_valid"].sum(dim=1).max() <= model.config.n_candidates


def test_token_budget_base_grid():
    cfg = SapiensIDConfig.preset("base")
    assert cfg.n_candidates == 432 and cfg.side == 12


def test_missing_rois_degrade_to_fewer_levels():
    torch.manual_seed(0)
    model = SapiensID(SapiensIDConfig.preset("tiny")).eval()
    side = model.config.side
    kps = _person_keypoints(3)
    kps[1, 17:] = -1  # no face landmarks: the face box needs 2 of the 5 face points
    kps[1, 0:3] = -1
    kps[2] = -1  # nothing detected at all
    images = torch.rand(3, 3, S, S) * 2 - 1
    with torch.no_grad():
        out, aux = model.net(images, None, kps, return_aux=True)
    assert torch.isfinite(out).all()
    assert aux["roi_ok"].tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    levels = [set((aux["ids_keep"][i][aux["kept_valid"][i]] // (side * side)).tolist()) for i in range(3)]
    assert levels == [{0, 1, 2}, {0, 1}, {0}]
    # with everything missing, the whole image (all foreground) gives all its g*g tokens
    assert int(aux["kept_valid"][2].sum()) == side * side
    assert aux["ids_keep"].shape[1] <= model.config.n_candidates


def test_box_rules_and_snapping():
    kp19 = to_kp19(_person_keypoints(1))
    face, torso = face_boxes(kp19), torso_boxes(kp19)
    assert (face[:, 2] > face[:, 0]).all() and (torso[:, 2] > torso[:, 0]).all()
    # boxes are square in normalised units unless clamped
    assert torch.allclose(face[:, 2] - face[:, 0], face[:, 3] - face[:, 1], atol=1e-6)
    face_s, torso_s = snap_rois(face, torso, 12)
    assert torch.allclose(torso_s * 12, (torso_s * 12).round(), atol=1e-5)  # on whole-image patch borders
    rel = (face_s[:, [0, 2]] - torso_s[:, :1]) / (torso_s[:, 2:3] - torso_s[:, :1]) * 12
    assert torch.allclose(rel, rel.round(), atol=1e-4)  # on torso-grid borders
    assert (face_s[:, :2] <= face[:, :2] + 1e-6).all() and (face_s[:, 2:] >= face[:, 2:] - 1e-6).all()
    assert torch.equal(snap_to_grid(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 12), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
