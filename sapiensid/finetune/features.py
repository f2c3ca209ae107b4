"""Evaluation features: SapiensID's global embedding, or global + the mean of its face / torso / lower-body
part features.

The Semantic Attention Head already pools the backbone tokens per keypoint: 4 queries per kp19 point, each
giving an attention-pooled and a nearest-token feature (152 part vectors of the backbone width, weighted by the
per-dataset part weights) before its flatten-linear-BN projection. ``global_parts`` reads those 152 vectors
(a forward hook on the projection's input, so the model code is unchanged), averages the valid ones of each
body part, averages the three parts (those with at least one visible keypoint), and concatenates the
L2-normalised global embedding with the L2-normalised part mean. Part keypoints (kp19 order: nose, L/R eye,
L/R mouth, L/R ear, then the 12 COCO body points shoulders..ankles):

* face: kp19 0-6; torso: shoulders, elbows, wrists, hips (kp19 7-14); lower body: knees, ankles (kp19 15-18).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiensid.keypoints import preprocess_keypoints, valid_mask
from sapiensid.model import hflip_inputs
from sapiensid.sah import SemanticAttentionHead

FEATURES = ("global", "global_parts")
PART_KEYPOINTS = {"face": range(0, 7), "torso": range(7, 15), "lower_body": range(15, 19)}


def _head(model: nn.Module) -> SemanticAttentionHead:
    for m in model.modules():
        if isinstance(m, SemanticAttentionHead):
            return m
    raise ValueError("model has no Semantic Attention Head")


def _part_mean(parts: torch.Tensor, kp_ok: torch.Tensor, per_query: int) -> torch.Tensor:
    """parts (B, 2 * 19 * per_query, D), kp_ok (B, 19) -> (B, D) mean over the visible parts."""
    b, n, d = parts.shape
    nq = n // 2
    q_ok = kp_ok.repeat_interleave(per_query, dim=1).float()  # (B, nq)
    both = parts[:, :nq] + parts[:, nq:]  # attention-pooled + nearest-token feature of each query
    acc = parts.new_zeros(b, d)
    count = parts.new_zeros(b, 1)
    for kps in PART_KEYPOINTS.values():
        cols = [k * per_query + j for k in kps for j in range(per_query)]
        w = q_ok[:, cols]
        n_ok = w.sum(dim=1, keepdim=True)
        mean = (both[:, cols] * w[..., None]).sum(dim=1) / (2 * n_ok.clamp_min(1))
        has = (n_ok > 0).float()
        acc = acc + mean * has
        count = count + has
    return acc / count.clamp_min(1)


def _forward(model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None, ldmks: torch.Tensor,
             with_parts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not with_parts:
        return model(images, masks, ldmks), None
    head = _head(model)
    captured: list[torch.Tensor] = []
    hook = head.flatten_feature.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        glob = model(images, masks, ldmks)
    finally:
        hook.remove()
    parts = captured[-1].view(images.shape[0], head.n_parts, -1)
    kp19, _, _ = preprocess_keypoints(ldmks, training=False)
    return glob, _part_mean(parts, valid_mask(kp19), head.per_query)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None, ldmks: torch.Tensor,
          kind: str = "global", flip: bool = True) -> torch.Tensor:
    """L2-normalised evaluation features with flip TTA: (B, D) global, (B, D + dim) global_parts.
    Puts `model` in eval mode (every valid token kept, BatchNorm running statistics)."""
    if kind not in FEATURES:
        raise ValueError(f"unknown feature kind {kind!r}; use one of {FEATURES}")
    model.eval()
    parts_on = kind == "global_parts"
    g, p = _forward(model, images, masks, ldmks, parts_on)
    if flip:
        g2, p2 = _forward(model, *hflip_inputs(images, masks, ldmks), parts_on)
        g = g + g2
        p = p + p2 if p is not None and p2 is not None else p
    g = F.normalize(g.float(), dim=1)
    if p is None:
        return g
    return F.normalize(torch.cat([g, F.normalize(p.float(), dim=1)], dim=1), dim=1)
