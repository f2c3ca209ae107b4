"""KP-RPE inside SapiensID: keypoint-conditioned relative position bias for every block and head.

* For each token t and keypoint k the input is ``PE(t) - PE(k)`` (PE(k) = bilinear sample of the sin-cos
  map at the keypoint, ``align_corners=True``); missing keypoints and the CLS / padding / mask tokens
  use the sentinel value -2 in every channel.
* A mapping network turns the (19, D) per-token input into ``depth*heads*nb`` numbers: Linear(D, 32) per
  keypoint, flatten, Linear(19*32, hidden), ReLU, Linear(hidden, depth*heads*nb) (last layer zero-init).
* Buckets: iRPE product buckets (ratio 1.9, 49) of the token displacement plus one extra bucket (49)
  for any pair involving CLS or the mask token. Token positions are their ROI-local grid cells mapped onto
  a (g+2)x(g+2) table by nearest sampling with (row, col) read as (x, y), i.e. transposed and scaled by
  (g+1)/(g-1): the reference's convention, kept so released weights apply.

Because Linear(D, 32) is linear, ``W(PE_t - PE_k) + b = W PE_t - W PE_k + b``: we project the token and
keypoint PEs to 32 dims first and subtract, which avoids a (B, N, 19, D) tensor. Results equal the
reference up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiensid.vit import num_product_buckets, product_bucket

INVALID_REL_VALUE = -2.0


class NonlinearMapping(nn.Module):
    def __init__(self, in_dim: int, n_kps: int, c1: int, hidden: int, c2: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, c1)
        self.fc = nn.Sequential(nn.Linear(n_kps * c1, hidden), nn.ReLU(), nn.Linear(hidden, c2))
        nn.init.zeros_(self.fc[2].weight)
        nn.init.zeros_(self.fc[2].bias)


class SapiensKPRPE(nn.Module):
    def __init__(
        self, dim: int, depth: int, num_heads: int, num_keypoints: int, side: int, ratio: float = 1.9,
        kp_dim: int = 32, hidden: int = 512,
    ) -> None:
        super().__init__()
        self.depth, self.num_heads, self.side, self.ratio = depth, num_heads, side, ratio
        # +1: the extra bucket for CLS / mask-token pairs
        self.num_buckets = num_product_buckets(ratio) + 1
        self.keypoint_linear = NonlinearMapping(dim, num_keypoints, kp_dim, hidden, self.num_buckets * num_heads * depth)
        # table coordinates of every ROI-local cell (transposed, scaled onto the (side+2) table)
        cells = torch.arange(side, dtype=torch.float64)
        mapped = torch.round(cells * (side + 1) / max(side - 1, 1)).long()
        local = torch.arange(side * side)
        table_row = mapped[local % side]  # the reference feeds the column index as the table row
        table_col = mapped[local // side]
        self.register_buffer("table_row", table_row, persistent=False)
        self.register_buffer("table_col", table_col, persistent=False)

    def tables(
        self, token_pe: torch.Tensor, token_ok: torch.Tensor, kp_pe: torch.Tensor, kp_ok: torch.Tensor
    ) -> torch.Tensor:
        """Per-query lookup tables (B, depth, heads, N, nb).

        token_pe (B, N, D) and token_ok (B, N): PE of each sequence token and whether it is a real patch
        token (False for CLS, padding and the mask token); kp_pe (B, K, D), kp_ok (B, K).
        """
        lin = self.keypoint_linear.linear1
        w, bias = lin.weight, lin.bias
        t = token_pe @ w.t()  # (B, N, c1)
        k = kp_pe @ w.t()  # (B, K, c1)
        rel = t[:, :, None, :] - k[:, None, :, :] + bias  # linear1(PE_t - PE_k)
        sentinel = lin(torch.full((1, w.shape[1]), INVALID_REL_VALUE, dtype=w.dtype, device=w.device))[0]
        ok = token_ok[:, :, None] & kp_ok[:, None, :]
        rel = torch.where(ok[..., None], rel, sentinel)
        out = self.keypoint_linear.fc(rel.flatten(2))  # (B, N, depth*heads*nb), layer-major
        b, n, _ = out.shape
        return out.view(b, n, self.depth, self.num_heads, self.num_buckets).permute(0, 2, 3, 1, 4)

    def buckets(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """(B, n+2, n+2) bucket ids for [CLS, kept tokens..., mask token]."""
        local = ids_keep % (self.side * self.side)
        r = self.table_row[local]
        c = self.table_col[local]
        inner = product_bucket(r[:, :, None] - r[:, None, :], c[:, :, None] - c[:, None, :], self.ratio)
        return F.pad(inner, (1, 1, 1, 1), value=self.num_buckets - 1)


def keypoint_pe(square_pe: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """(B, K, D) PE sampled at keypoints (x, y in [0,1]; align_corners=True; zeros for missing)."""
    b = kp.shape[0]
    grid = (kp * 2 - 1).unsqueeze(2).to(square_pe.dtype)  # (B, K, 1, 2)
    out = F.grid_sample(square_pe.expand(b, -1, -1, -1), grid, mode="bilinear", align_corners=True)
    return out.squeeze(3).transpose(1, 2)
