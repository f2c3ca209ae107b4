"""Semantic Attention Head (SAH): keypoint-query pooling of the backbone tokens into a 4096-d embedding.

* Queries: each keypoint's PE repeated ``m`` times (76 = 19 x 4) plus learned offsets ``query_pos_emb``.
* One differential-attention layer (Diff-Transformer style, 1 head): keys are the tokens' PEs, values
  the backbone tokens; ``A = softmax(Q1 K1) - lambda * softmax(Q2 K2)``, RMSNorm (no affine), times
  ``1 - lambda_init``, output projection. Queries of missing keypoints give zeros.
* A second, gradient-free branch picks, for each query, the token whose PE is most cosine-similar to the
  query and takes its feature (zero for missing keypoints).
* The 152 parts are weighted by ``sigmoid(learned_mask[dataset])`` (per-dataset part weights), flattened
  and mapped by Linear-BN-Linear-BN to the output embedding (not L2-normalised).

``key_mask`` (B, N) marks real tokens; padding tokens are excluded from attention and from the nearest-PE
choice (the reference attended to them, which made evaluation depend on batch neighbours).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lambda_init_for_depth(depth: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DiffAttention(nn.Module):
    """Single-head differential attention with the official parameter names."""

    def __init__(self, dim: int, depth: int = 1) -> None:
        super().__init__()
        self.head_dim = dim // 2
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.lambda_init = lambda_init_for_depth(depth)
        self.lambda_q1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(self.head_dim) * 0.1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, nq, d = query.shape
        nk = key.shape[1]
        q = self.q_proj(query).view(b, nq, 2, self.head_dim).transpose(1, 2) * self.scaling
        k = self.k_proj(key).view(b, nk, 2, self.head_dim).transpose(1, 2)
        v = self.v_proj(value)  # (B, N, D): one kv head carrying 2*head_dim channels
        logits = torch.nan_to_num(q @ k.transpose(-1, -2))  # (B, 2, Q, N)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min / 4)
        attn = logits.float().softmax(dim=-1).to(q.dtype)
        lam1 = torch.exp((self.lambda_q1 * self.lambda_k1).sum().float()).to(q.dtype)
        lam2 = torch.exp((self.lambda_q2 * self.lambda_k2).sum().float()).to(q.dtype)
        lam = lam1 - lam2 + self.lambda_init
        weights = attn[:, 0] - lam * attn[:, 1]  # (B, Q, N)
        out = weights @ v
        out = out.float()
        out = (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5)).to(v.dtype)
        out = out * (1 - self.lambda_init)
        if key_mask is not None:
            # a sample with no real token at all gets zeros instead of an average over padding
            out = out * key_mask.any(dim=1).to(out.dtype)[:, None, None]
        return self.out_proj(out)


class SemanticAttentionHead(nn.Module):
    def __init__(self, dim: int, num_keypoints: int, per_query: int, output_dim: int, n_datasets: int = 1, depth: int = 1) -> None:
        super().__init__()
        self.per_query = per_query
        self.n_query = num_keypoints * per_query
        self.n_parts = 2 * self.n_query
        self.n_datasets = n_datasets
        self.query_pos_emb = nn.Parameter(torch.randn(1, self.n_query, dim) * 0.02)
        self.attn = DiffAttention(dim, depth)
        self.flatten_feature = nn.Sequential(
            nn.Linear(dim * self.n_parts, output_dim, bias=False),
            nn.BatchNorm1d(output_dim, eps=2e-5),
            nn.Linear(output_dim, output_dim, bias=False),
            nn.BatchNorm1d(output_dim, eps=2e-5),
        )
        self.learned_mask = nn.Parameter(torch.zeros(n_datasets, self.n_parts))

    def part_weights(self, batch: int, dataset_index: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        w = self.learned_mask.sigmoid()
        if dataset_index is None:
            return w[0].unsqueeze(0).expand(batch, -1)
        idx = torch.as_tensor(dataset_index, device=device).long().view(-1)
        if idx.numel() != batch or int(idx.min()) < 0 or int(idx.max()) >= self.n_datasets:
            raise ValueError(f"dataset_index must hold {batch} values in [0, {self.n_datasets})")
        return w[idx]

    def forward(
        self,
        tokens: torch.Tensor,
        token_pe: torch.Tensor,
        key_mask: torch.Tensor | None,
        kp_pe: torch.Tensor,
        kp_ok: torch.Tensor,
        dataset_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, token_pe (B, N, D); key_mask (B, N) or None; kp_pe (B, K, D); kp_ok (B, K)."""
        b, _, d = tokens.shape
        queries = kp_pe.repeat_interleave(self.per_query, dim=1) + self.query_pos_emb
        q_ok = kp_ok.repeat_interleave(self.per_query, dim=1)
        pooled = self.attn(queries, token_pe, tokens, key_mask)
        pooled = pooled * q_ok[..., None].to(pooled.dtype)

        with torch.no_grad():
            sim = F.normalize(token_pe, dim=2) @ F.normalize(queries, dim=2).transpose(1, 2)  # (B, N, Q)
            if key_mask is not None:
                sim = sim.masked_fill(~key_mask[..., None], float("-inf"))
            nearest = sim.argmax(dim=1)  # (B, Q)
        picked = torch.gather(tokens, 1, nearest[..., None].expand(-1, -1, d))
        picked = picked * q_ok[..., None].to(picked.dtype)

        parts = torch.cat([pooled, picked], dim=1) * self.part_weights(b, dataset_index, tokens.device)[..., None]
        return self.flatten_feature(parts.flatten(1))
