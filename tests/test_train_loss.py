"""AdaFace + Partial FC: formula, EMA statistics, class-centre sampling, and two-rank sharding (gloo)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sapiensid.loss import PartialFCAdaFace


def reference_adaface(emb, labels, weight, mu, sigma, s=64.0, m=0.4, h=0.333):
    """Straight from the paper's formula, on the full class set."""
    norms = emb.norm(dim=1).clamp(0.001, 100).detach()
    g = ((norms - mu) / (sigma + 1e-3) * h).clamp(-1, 1)
    cos = F.normalize(emb) @ F.normalize(weight).t()
    theta = torch.acos(cos.gather(1, labels[:, None]).squeeze(1).clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.cos((theta - m * g).clamp(1e-7, math.pi - 1e-7)) - (m + m * g)
    logits = cos.scatter(1, labels[:, None], target[:, None]) * s
    return F.cross_entropy(logits, labels)


def test_full_softmax_matches_formula_and_updates_ema():
    torch.manual_seed(0)
    head = PartialFCAdaFace(num_classes=10, dim=16)
    emb = torch.randn(8, 16) * 15
    labels = torch.randint(0, 10, (8,))
    norms = emb.norm(dim=1)
    mu = 0.99 * 20 + 0.01 * norms.mean()
    sigma = 0.99 * 100 + 0.01 * norms.std()
    loss, stats = head(emb, labels)
    expected = reference_adaface(emb, labels, head.weight.detach(), mu, sigma)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert float(head.margin.batch_mean) == pytest.approx(float(mu), rel=1e-6)
    assert stats["sampled_classes"] == 10
    head.eval()  # frozen statistics in eval
    head(emb, labels)
    assert float(head.margin.batch_mean) == pytest.approx(float(mu), rel=1e-6)


def test_class_centre_sampling_keeps_positives():
    torch.manual_seed(1)
    head = PartialFCAdaFace(num_classes=1000, dim=8, sample_rate=0.05, seed=3)
    emb = torch.randn(16, 8, requires_grad=True)
    labels = torch.randint(0, 1000, (16,))
    loss, stats = head(emb, labels)
    assert stats["sampled_classes"] == 50
    loss.backward()
    grad_rows = torch.nonzero(head.weight.grad.abs().sum(1)).squeeze(1)
    assert set(labels.tolist()) <= set(grad_rows.tolist())  # every positive centre was scored
    assert len(grad_rows) <= 50  # and no unsampled centre got a gradient
    with pytest.raises(ValueError, match="labels"):
        head(emb, torch.full((16,), 1000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, emb_all, labels_all, weight_full, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        head = PartialFCAdaFace(num_classes=7, dim=emb_all.shape[1])
        with torch.no_grad():  # rank 0 holds classes 0..3, rank 1 holds 4..6
            head.weight.copy_(weight_full[head.class_start : head.class_start + head.num_local])
        emb = emb_all[rank * 3 : rank * 3 + 3].clone().requires_grad_(True)
        loss, _ = head(emb, labels_all[rank * 3 : rank * 3 + 3])
        loss.backward()
        # emulate DDP's gradient averaging of the backbone
        g = emb.grad.clone() / 2
        out[rank] = (loss.detach(), g, head.weight.grad.clone(), head.class_start)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_full_softmax():
    torch.manual_seed(2)
    emb_all = torch.randn(6, 8) * 10
    labels_all = torch.tensor([0, 5, 3, 6, 1, 4])
    weight = torch.randn(7, 8)
    ref_head = PartialFCAdaFace(num_classes=7, dim=8)
    with torch.no_grad():
        ref_head.weight.copy_(weight)
    e = emb_all.clone().requires_grad_(True)
    ref_loss, _ = ref_head(e, labels_all)
    ref_loss.backward()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), emb_all, labels_all, weight, out), nprocs=2, join=True)
    for rank in (0, 1):
        loss, g, wgrad, start = out[rank]
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        # after DDP averaging each rank's local embeddings carry the full-softmax gradient
        assert torch.allclose(g, e.grad[rank * 3 : rank * 3 + 3], atol=1e-5)
        assert torch.allclose(wgrad, ref_head.weight.grad[start : start + len(wgrad)], atol=1e-5)
