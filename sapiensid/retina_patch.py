"""Retina Patch: multi-scale patch candidates from three ROIs (whole image, upper torso, face).

For each sample (docs/official-pipeline.md 2.5):

1. Boxes are snapped to patch borders: the torso box to the whole-image ``g x g`` grid, the face box
   to the torso box's ``g x g`` grid (snapping only enlarges).
2. A pixel importance map holds the finest level covering each pixel (0 whole, 1 torso, 2 face).
3. Each ROI is resampled to the input size (bilinear, corner-aligned linspace grid,
   ``align_corners=False``, zero padding: exactly the reference so released weights apply) and cut into
   ``g x g`` patches of ``p`` pixels: ``3 * g * g`` candidates (432 for the base config).
4. A candidate is *valid* when more than half of its pixels have importance equal to its own level, so
   every image region is represented by exactly one level. Whole-image candidates must also be more
   than half foreground (the white-padding mask).
5. Each candidate carries the frozen 2D sin-cos PE of its image location: the ``g x g`` PE map is
   grid-sampled over the ROI (finer spacing inside the torso / face boxes); optionally a learned
   per-level embedding is added.

Missing boxes (no face or no torso keypoints) make that level empty: the model degrades to fewer levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiensid.keypoints import box_valid

N_LEVELS = 3
WHOLE_BOX = (0.0, 0.0, 1.0, 1.0)


def sincos_2d(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(side*side, dim) fixed 2D sin-cos PE: [sin(x w), cos(x w), sin(y w), cos(y w)], row-major cells."""
    if dim % 4 != 0:
        raise ValueError(f"sin-cos PE needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(quarter) / max(quarter - 1, 1)))
    xs = x.flatten()[:, None] * omega[None, :]
    ys = y.flatten()[:, None] * omega[None, :]
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1).float()


def snap_to_grid(boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Enlarge xyxy boxes in [0,1] to the nearest enclosing multiples of 1/side, clamped to [0,1]."""
    s = boxes * side
    out = torch.stack([s[:, 0].floor(), s[:, 1].floor(), s[:, 2].ceil(), s[:, 3].ceil()], dim=1) / side
    return out.clamp(0, 1)


def _parent_size(parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = parent[:, 2] - parent[:, 0]
    h = parent[:, 3] - parent[:, 1]
    # a zero-size parent (missing torso box) acts as the whole image
    return torch.where(w == 0, torch.ones_like(w), w), torch.where(h == 0, torch.ones_like(h), h)


def to_parent_coords(boxes: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    w, h = _parent_size(parent)
    out = boxes.clone()
    out[:, [0, 2]] = (boxes[:, [0, 2]] - parent[:, 0:1]) / w[:, None]
    out[:, [1, 3]] = (boxes[:, [1, 3]] - parent[:, 1:2]) / h[:, None]
    return out.clamp(0, 1)


def from_parent_coords(boxes: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    w, h = _parent_size(parent)
    out = boxes.clone()
    out[:, [0, 2]] = boxes[:, [0, 2]] * w[:, None] + parent[:, 0:1]
    out[:, [1, 3]] = boxes[:, [1, 3]] * h[:, None] + parent[:, 1:2]
    return out.clamp(0, 1)


def snap_rois(face: torch.Tensor, torso: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap the torso box to the image grid and the face box to the torso box's grid."""
    torso_s = snap_to_grid(torso, side)
    face_s = from_parent_coords(snap_to_grid(to_parent_coords(face, torso_s), side), torso_s)
    return face_s, torso_s


def sampling_grid(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height, width, 2) grid_sample grid whose first/last samples sit on the box edges."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    xs = torch.linspace(-1, 1, width, device=boxes.device, dtype=torch.float32)
    ys = torch.linspace(-1, 1, height, device=boxes.device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    gx = gx[None] * w.view(-1, 1, 1) / 2 + cx.view(-1, 1, 1)
    gy = gy[None] * h.view(-1, 1, 1) / 2 + cy.view(-1, 1, 1)
    return torch.stack([gx * 2 - 1, gy * 2 - 1], dim=-1)


def importance_map(rois: torch.Tensor, roi_ok: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) float map: max level whose (valid) ROI overlaps each pixel [X, X+1) x [Y, Y+1)."""
    b = rois.shape[0]
    xs = torch.arange(width, device=rois.device, dtype=torch.float32)
    ys = torch.arange(height, device=rois.device, dtype=torch.float32)
    imap = torch.zeros(b, height, width, device=rois.device)
    for level in range(1, rois.shape[1]):
        box = rois[:, level]
        in_x = (xs[None] + 1 > box[:, 0:1] * width) & (xs[None] < box[:, 2:3] * width)
        in_y = (ys[None] + 1 > box[:, 1:2] * height) & (ys[None] < box[:, 3:4] * height)
        cover = in_y[:, :, None] & in_x[:, None, :] & roi_ok[:, level, None, None]
        imap = torch.where(cover, torch.full_like(imap, float(level)), imap)
    return imap.unsqueeze(1)


def foreground_tokens(masks: torch.Tensor | None, batch: int, side: int, device: torch.device) -> torch.Tensor:
    """(B, side*side) bool: a cell is foreground when more than half of its mask pixels are."""
    if masks is None:
        return torch.ones(batch, side * side, dtype=torch.bool, device=device)
    if masks.ndim != 3 or masks.shape[0] != batch:
        raise ValueError(f"expected foreground masks (B, H, W) with B={batch}, got {tuple(masks.shape)}")
    mh, mw = masks.shape[1:]
    if mh % side or mw % side:
        raise ValueError(f"foreground mask size {mh}x{mw} is not divisible by the {side}x{side} grid")
    cells = F.unfold(masks.unsqueeze(1).float(), kernel_size=(mh // side, mw // side), stride=(mh // side, mw // side))
    return (cells == 1).float().mean(dim=1) > 0.5


class RetinaPatch(nn.Module):
    """Candidate patches, validity and PEs for the three ROIs; linear patch embedding."""

    def __init__(self, patch_size: int, dim: int, level_emb: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(patch_size * patch_size * 3, dim)
        nn.init.zeros_(self.patch_embed.bias)
        if level_emb:
            self.level_embed = nn.Parameter(torch.zeros(N_LEVELS, dim))
            nn.init.trunc_normal_(self.level_embed, std=0.02)
        else:
            self.level_embed = None

    def candidates(
        self,
        images: torch.Tensor,
        fg_tokens: torch.Tensor,
        face_boxes: torch.Tensor,
        torso_boxes: torch.Tensor,
        square_pe: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """All ``3*g*g`` candidates in the order [whole | torso | face], each row-major.

        Returns patches (B, 3g², 3p²), valid (B, 3g²) bool, pe (B, 3g², D), rois (B, 3, 4),
        roi_ok (B, 3) bool. ``square_pe`` is the (1, D, g, g) PE map.
        """
        b, c, h, w = images.shape
        p = self.patch_size
        side = h // p
        face_s, torso_s = snap_rois(face_boxes.float(), torso_boxes.float(), side)
        whole = torch.tensor(WHOLE_BOX, device=images.device).expand(b, 4)
        rois = torch.stack([whole, torso_s, face_s], dim=1)  # (B, 3, 4)
        roi_ok = torch.stack([torch.ones(b, dtype=torch.bool, device=images.device), box_valid(torso_s), box_valid(face_s)], dim=1)
        imap = importance_map(rois, roi_ok, h, w)

        grid = sampling_grid(rois.reshape(b * N_LEVELS, 4), h, w)  # (3B, H, W, 2), level-minor
        imgs = images.float().repeat_interleave(N_LEVELS, dim=0)
        crops = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        patches = F.unfold(crops, kernel_size=p, stride=p).transpose(1, 2)  # (3B, g², 3p²), [c][y][x]
        imaps = F.grid_sample(imap.repeat_interleave(N_LEVELS, dim=0), grid, mode="nearest", align_corners=False)
        levels = torch.arange(N_LEVELS, device=images.device).repeat(b).view(-1, 1, 1).float()
        own = (F.unfold(imaps, kernel_size=p, stride=p) == levels).float().mean(dim=1) > 0.5  # (3B, g²)

        own = own.view(b, N_LEVELS, side * side) & roi_ok[:, :, None]
        own[:, 0] &= fg_tokens
        patches = patches.reshape(b, N_LEVELS * side * side, c * p * p)

        pe_grid = sampling_grid(rois[:, 1:].reshape(b * 2, 4), side, side)
        roi_pe = F.grid_sample(square_pe.expand(b * 2, -1, -1, -1), pe_grid, mode="bilinear", align_corners=False)
        roi_pe = roi_pe.view(b, 2, -1, side * side)
        whole_pe = square_pe.flatten(2).expand(b, -1, -1)[:, None]
        pe = torch.cat([whole_pe, roi_pe], dim=1)  # (B, 3, D, g²)
        if self.level_embed is not None:
            pe = pe + self.level_embed[None, :, :, None]
        pe = pe.transpose(2, 3).reshape(b, N_LEVELS * side * side, -1)
        return {"patches": patches, "valid": own.reshape(b, -1), "pe": pe, "rois": rois, "roi_ok": roi_ok}

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(patches)
