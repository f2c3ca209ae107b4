"""CVLface ViT with KP-RPE (keypoint relative position encoding) face recognition model.

Architecture of ``v1_base_kprpe_splithead_unshared`` (docs/official-pipeline.md section 4):

* 112x112 RGB in [-1, 1] -> conv patch embed 8x8 -> 14x14 = 196 tokens + learnable absolute PE, no CLS;
* 24 pre-LN blocks (dim 512, 16 heads, MLP x3 ReLU6, qkv without bias, drop-path 0.1);
* KP-RPE: for every patch centre ``c = ((col+0.5)/14, (row+0.5)/14)`` the 10-d vector of offsets
  ``c - kp_k`` to the five landmarks goes through one zero-initialised ``Linear(10, 49*heads*depth)``;
  that gives, for each query patch, a 49-entry table per layer and head. The bias of (query i, key j) is
  ``table[i, bucket(pos_i - pos_j)]`` with iRPE product buckets (ratio 1.9);
* head: flatten 196*512 -> Linear(no bias) -> BN(eps 2e-5) -> Linear(no bias) -> BN -> raw 512-d.

The blocks are :class:`sapiensid.vit.Block`, shared with the SapiensID backbone. State-dict names
equal the released ``pretrained_model/model.pt`` (``net.*``) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sapiensid.checkpoint import CheckpointMismatchError, load_strict
from sapiensid.vit import (
    Block,
    drop_path_rates,
    expand_buckets,
    gather_contextual_bias,
    grid_bucket_ids,
    init_vit_weights,
    num_product_buckets,
)

__all__ = [
    "CheckpointMismatchError",
    "KPRPEFaceConfig",
    "KPRPEFaceModel",
    "build_kprpe_face_vit",
    "load_kprpe_face_weights",
    "relative_keypoints",
]


@dataclass(frozen=True)
class KPRPEFaceConfig:
    img_size: int = 112
    patch_size: int = 8
    dim: int = 512
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 3.0
    drop_path_rate: float = 0.1
    output_dim: int = 512
    num_keypoints: int = 5
    rpe_ratio: float = 1.9

    @property
    def side(self) -> int:
        return self.img_size // self.patch_size


_SIZES = {
    "base": KPRPEFaceConfig(),
    # fast-test size: same token grid and keypoint convention, tiny widths
    "tiny": KPRPEFaceConfig(dim=64, depth=2, num_heads=4, output_dim=64, drop_path_rate=0.0),
}


def relative_keypoints(keypoints: torch.Tensor, side: int) -> torch.Tensor:
    """(B, K, 2) keypoints in [0,1] -> (B, side*side, 2K) offsets ``patch_centre - kp``.

    Patch order is row-major; each offset is (x, y) and keypoints are concatenated in order:
    ``[c_x - k0_x, c_y - k0_y, c_x - k1_x, ...]``.
    """
    centres = (torch.arange(side, dtype=keypoints.dtype, device=keypoints.device) + 0.5) / side
    cy = centres.repeat_interleave(side)  # row index varies slowest
    cx = centres.repeat(side)
    grid = torch.stack([cx, cy], dim=-1)  # (N, 2)
    diff = grid[None, :, None, :] - keypoints[:, None, :, :]  # (B, N, K, 2)
    return diff.flatten(2)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformerWithKPRPE(nn.Module):
    """The ``.net`` of the CVLface model (names match the released checkpoints without ``net.``)."""

    def __init__(self, cfg: KPRPEFaceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.side * cfg.side
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.dim))
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        rates = drop_path_rates(cfg.depth, cfg.drop_path_rate)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim)
        self.feature = nn.Sequential(
            nn.Linear(cfg.dim * n, cfg.dim, bias=False),
            nn.BatchNorm1d(cfg.dim, eps=2e-5),
            nn.Linear(cfg.dim, cfg.output_dim, bias=False),
            nn.BatchNorm1d(cfg.output_dim, eps=2e-5),
        )
        self.num_buckets = num_product_buckets(cfg.rpe_ratio)
        self.keypoint_linear = nn.Linear(2 * cfg.num_keypoints, self.num_buckets * cfg.num_heads * cfg.depth)
        self.register_buffer("bucket_ids", grid_bucket_ids(cfg.side, cfg.rpe_ratio), persistent=False)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_vit_weights)
        # zero init: the model starts as a plain ViT and learns the keypoint dependence
        nn.init.zeros_(self.keypoint_linear.weight)
        nn.init.zeros_(self.keypoint_linear.bias)

    def kprpe_tables(self, keypoints: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(B, depth, heads, N, nb) per-query lookup tables from the relative keypoints."""
        cfg = self.cfg
        rel = relative_keypoints(keypoints.to(self.pos_embed.dtype), cfg.side)
        tables = self.keypoint_linear(rel)  # (B, N, depth*heads*nb), layer-major then head then bucket
        b = tables.shape[0]
        return tables.view(b, n_tokens, cfg.depth, cfg.num_heads, self.num_buckets).permute(0, 2, 3, 1, 4)

    def forward_features(self, x: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1:] != (3, cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images (B, 3, {cfg.img_size}, {cfg.img_size}), got {tuple(x.shape)}")
        if keypoints.shape != (x.shape[0], cfg.num_keypoints, 2):
            raise ValueError(f"expected keypoints (B, {cfg.num_keypoints}, 2), got {tuple(keypoints.shape)}")
        tokens = self.patch_embed(x) + self.pos_embed
        tables = self.kprpe_tables(keypoints, tokens.shape[1])
        index = expand_buckets(self.bucket_ids.unsqueeze(0), x.shape[0], cfg.num_heads)
        for blk, table in zip(self.blocks, tables.unbind(1)):
            tokens = blk(tokens, offset_bias=gather_contextual_bias(table, index))
        tokens = self.norm(tokens)
        return tokens.flatten(1)

    def forward(self, x: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x, keypoints))


class KPRPEFaceModel(nn.Module):
    """Wrapper whose state dict is ``net.*``, the layout of CVLface's ``pretrained_model/model.pt``."""

    def __init__(self, cfg: KPRPEFaceConfig) -> None:
        super().__init__()
        self.net = VisionTransformerWithKPRPE(cfg)
        self.output_dim = cfg.output_dim
        self.config = cfg

    def forward(self, x: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """x: (B,3,112,112) RGB in [-1,1]; keypoints: (B,5,2) in [0,1] of the crop -> (B, output_dim)."""
        return self.net(x, keypoints)


def build_kprpe_face_vit(size: str = "base") -> KPRPEFaceModel:
    """Build the CVLface ViT KP-RPE face model: ``"base"`` (the released architecture) or ``"tiny"``."""
    if size not in _SIZES:
        raise ValueError(f"unknown KP-RPE face model size {size!r}; choose one of {sorted(_SIZES)}")
    model = KPRPEFaceModel(_SIZES[size])
    model.eval()
    return model


def load_kprpe_face_weights(model: KPRPEFaceModel, path: str | Path) -> KPRPEFaceModel:
    """Strictly load ``model.pt``/``.pth`` (``net.*``) or ``model.safetensors`` (``model.net.*``).

    Raises CheckpointMismatchError naming missing, unexpected or shape-mismatched keys.
    """
    return load_strict(model, path)  # type: ignore[return-value]
