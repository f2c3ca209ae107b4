"""Shared ViT pieces for SapiensID and the CVLface KP-RPE face model.

One attention implementation serves both models. It accepts:

* an additive per-head bias ``(B, H, N, N)`` (the KP-RPE offset bias),
* a per-key log-count ``(B, N)`` (the MRM attention-scaling trick: a single token that stands for ``c``
  identical tokens gets ``+log(c)`` on its attention logit, which is exactly equivalent to repeating it
  ``c`` times as a key),
* a boolean key padding mask ``(B, N)`` (True = key may be attended), used to make evaluation
  embeddings independent of the other images in a batch.

Parameter names follow the official checkpoints (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``) so both released state dicts load strictly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        noise = x.new_empty(shape).bernoulli_(keep)
        return x * noise / keep


class Mlp(nn.Module):
    """Two-layer MLP with ReLU6 (the CVLface face-ViT activation)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionBias(NamedTuple):
    """The additive attention-logit terms a block may get, each optional (the module docstring has them)."""

    offset_bias: torch.Tensor | None = None  # (B, H, N, N)
    log_count: torch.Tensor | None = None  # (B, N)
    key_mask: torch.Tensor | None = None  # (B, N) bool, True = key may be attended

    def total(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """All terms summed into one ``(B, H, N, N)`` (or broadcastable) tensor in `dtype`, or None."""
        bias: torch.Tensor | None = None
        if self.offset_bias is not None:
            bias = self.offset_bias.to(dtype)
        if self.log_count is not None:
            lc = self.log_count.to(dtype)[:, None, None, :]
            bias = lc if bias is None else bias + lc
        if self.key_mask is not None:
            # A large negative (not -inf) keeps rows finite even if a query could see no key at all.
            neg = torch.zeros(self.key_mask.shape, dtype=dtype, device=device)
            neg = neg.masked_fill(~self.key_mask, torch.finfo(dtype).min / 4)[:, None, None, :]
            bias = neg if bias is None else bias + neg
        return bias


class Attention(nn.Module):
    """Multi-head self-attention with optional additive bias, log-count bias and key padding mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, terms: AttentionBias = AttentionBias()) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # softmax(q k^T * scale + bias) v, written out (as the reference does): on CPU this is faster than
        # SDPA's math path with a float mask, and exact in float64 for the attention-scaling test
        logits = (q * self.scale) @ k.transpose(-2, -1)
        bias = terms.total(q.dtype, x.device)  # in q's dtype: under autocast that is the logits' dtype
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block (LayerNorm, attention, LayerNorm, ReLU6 MLP) with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, drop_path: float = 0.0) -> None:
        super().__init__()
        # registration order = the official state-dict order (norm1, norm2, attn, mlp)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        offset_bias: torch.Tensor | None = None,
        log_count: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        terms = AttentionBias(offset_bias, log_count, key_mask)
        x = x + self.drop_path(self.attn(self.norm1(x), terms))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """timm-style init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path_rates(depth: int, max_rate: float) -> list[float]:
    """Linear stochastic-depth schedule 0 -> max_rate over the blocks."""
    # plain Python so models can also be built on the meta device
    return [max_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


# ---------------------------------------------------------------------------------------------------
# iRPE "product" bucketing (shared by both KP-RPE variants)
# ---------------------------------------------------------------------------------------------------


def piecewise_index(rel: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """iRPE piecewise index: exact for |d| <= alpha, log-spaced beyond, capped at int(beta)."""
    rel = rel.to(torch.float64)
    absd = rel.abs()
    near = rel.round()
    safe = absd.clamp(min=alpha)  # avoids log(0) where the near branch is used anyway
    # magnitude is rounded and capped at beta before the sign is applied; the integer cast then
    # truncates toward zero (3.8 -> 3), as in the reference
    mag = (alpha + torch.log(safe / alpha) / math.log(gamma / alpha) * (beta - alpha)).round().clamp(max=beta)
    far = torch.trunc(torch.sign(rel) * mag)
    return torch.where(absd <= alpha, near, far).to(torch.long)


def irpe_params(ratio: float) -> tuple[float, float, float]:
    """alpha, beta, gamma of iRPE for a given ratio (1.9 -> 1.9, 3.8, 15.2)."""
    return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def product_bucket(d_row: torch.Tensor, d_col: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bucket id of a 2D displacement (rows, cols) for the iRPE product method: (r+b)*(2b+1) + (c+b)."""
    alpha, beta, gamma = irpe_params(ratio)
    b = int(beta)
    r = piecewise_index(d_row, alpha, beta, gamma) + b
    c = piecewise_index(d_col, alpha, beta, gamma) + b
    return r * (2 * b + 1) + c


def num_product_buckets(ratio: float) -> int:
    b = int(irpe_params(ratio)[1])
    return (2 * b + 1) ** 2


def grid_bucket_ids(side: int, ratio: float) -> torch.Tensor:
    """(side*side, side*side) bucket ids between all cells of a row-major grid: bucket(pos_i - pos_j)."""
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return product_bucket(rows[:, None] - rows[None, :], cols[:, None] - cols[None, :], ratio)


def gather_contextual_bias(ctx: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """bias[b, h, i, j] = ctx[b, h, i, buckets[b, i, j]].

    ctx: (B, H, N, nb) per-query lookup tables; buckets: (B or 1, N, N) long, or already (B, H, N, N).
    """
    b, h, n, _ = ctx.shape
    if buckets.ndim == 3:
        buckets = buckets.expand(b, n, n)[:, None].expand(b, h, n, n)
    return torch.gather(ctx, 3, buckets)


def expand_buckets(buckets: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(B or 1, N, N) -> (B, H, N, N) index view for :func:`gather_contextual_bias` (hoisted out of loops)."""
    n = buckets.shape[-1]
    return buckets.expand(batch, n, n)[:, None].expand(batch, heads, n, n)
