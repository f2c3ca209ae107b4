"""MRM attention scaling: one mask token with +log(c) on its logit == the mask token repeated c times."""

from __future__ import annotations

import math

import torch

from sapiensid.vit import Block


def _block(dim: int = 32, heads: int = 4) -> Block:
    torch.manual_seed(0)
    blk = Block(dim, heads, mlp_ratio=3.0).double().eval()
    for p in blk.parameters():  # non-trivial LayerNorm affine too
        torch.nn.init.normal_(p, std=0.3)
    return blk


def test_log_count_equals_repeated_mask_token_float64():
    dim, heads, n_real, count = 32, 4, 9, 23
    blk = _block(dim, heads)
    g = torch.Generator().manual_seed(1)
    real = torch.randn(2, n_real, dim, generator=g, dtype=torch.float64)
    mask = torch.randn(1, 1, dim, generator=g, dtype=torch.float64).expand(2, 1, dim)

    # KP-RPE-style per-query bias; every copy of the mask token shares the mask token's column
    bias_real = torch.randn(2, heads, n_real + 1, n_real + 1, generator=g, dtype=torch.float64)

    single = torch.cat([real, mask], dim=1)
    log_count = torch.zeros(2, n_real + 1, dtype=torch.float64)
    log_count[:, -1] = math.log(count)
    out_single = blk(single, offset_bias=bias_real, log_count=log_count)

    repeated = torch.cat([real, mask.expand(2, count, dim)], dim=1)
    cols = list(range(n_real)) + [n_real] * count
    bias_rep = bias_real[:, :, cols][:, :, :, cols]
    out_rep = blk(repeated, offset_bias=bias_rep)

    diff_real = (out_single[:, :n_real] - out_rep[:, :n_real]).abs().max().item()
    diff_mask = (out_single[:, n_real:] - out_rep[:, n_real:]).abs().max().item()  # every copy equals it
    assert diff_real <= 1e-9 and diff_mask <= 1e-9
    # and the bias matters: without it the outputs differ
    out_plain = blk(single, offset_bias=bias_real)
    assert (out_plain[:, :n_real] - out_rep[:, :n_real]).abs().max().item() > 1e-4


def test_masked_keys_have_no_influence():
    dim, heads = 32, 4
    blk = _block(dim, heads)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, dim, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, True, False, False, True]])
    out_a = blk(x, key_mask=keep)
    y = x.clone()
    y[:, 4:6] = torch.randn(1, 2, dim, generator=g, dtype=torch.float64) * 10  # change masked tokens
    out_b = blk(y, key_mask=keep)
    kept = keep[0]
    assert (out_a[:, kept] - out_b[:, kept]).abs().max().item() <= 1e-12
    # equals running the block on the kept tokens only
    out_c = blk(x[:, kept])
    assert (out_a[:, kept] - out_c).abs().max().item() <= 1e-12
