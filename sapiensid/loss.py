"""AdaFace loss with a class-centre classifier that scales to hundreds of thousands of identities.

AdaFace (Kim et al., CVPR 2022; CVLface defaults s=64, m=0.4, h=0.333, t_alpha=0.01): the margin of each sample
adapts to its feature norm, a proxy of image quality. With ``g = clip(h * (norm - mu) / (sigma + eps), -1, 1)``
(``mu``, ``sigma`` EMAs of the batch norm mean/std, initialised to 20 and 100), the target logit becomes
``cos(theta - m * g) - (m + m * g)`` (angular margin for low quality, additive for high), all logits times s.

Classifier (Partial FC, An et al. 2022): class centres are split across ranks (rank r holds a contiguous
block); embeddings and labels are all-gathered; each rank scores the gathered batch against the positive classes
it holds plus random negatives up to ``sample_rate`` of its block, and the softmax denominator is summed across
ranks. With one process and ``sample_rate=1`` this is the plain full softmax. Memory per rank is
``num_classes / world * dim`` and compute ``batch * sample_rate * num_classes / world``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward returns this rank's slice of the summed
    gradient (every rank's loss term depends on every rank's embeddings)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = _world()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        n = [int(t) for t in sizes]
        # Ranks may hold different batch sizes: pad to the largest, gather, then trim.
        pad = x.new_zeros((max(n) - x.shape[0], *x.shape[1:]))
        parts = [x.new_empty((max(n), *x.shape[1:])) for _ in range(world)]
        dist.all_gather(parts, torch.cat([x, pad]).contiguous())
        ctx.rank, ctx.sizes = rank, n
        return torch.cat([p[:k] for p, k in zip(parts, n)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce sum whose backward is the identity: every rank computes the same loss from the summed value,
    so d loss / d (local part) equals d loss / d sum on each rank, with no double counting."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def _gather(x: torch.Tensor) -> torch.Tensor:
    return x if _world()[1] == 1 else _AllGather.apply(x)


def _sum(x: torch.Tensor) -> torch.Tensor:
    return x if _world()[1] == 1 else _SumAcrossRanks.apply(x)


class AdaFaceMargin(nn.Module):
    """Turns target cosines into AdaFace logits; keeps the feature-norm EMA statistics as buffers."""

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01, eps: float = 1e-3):
        super().__init__()
        self.s, self.m, self.h, self.t_alpha, self.eps = s, m, h, t_alpha, eps
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """g in [-1, 1] per sample; updates the EMAs in training (norms must be the global batch's)."""
        safe = norms.detach().clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                mean = safe.mean()
                std = safe.std() if safe.numel() > 1 else torch.zeros_like(mean)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        g = (safe - self.batch_mean) / (self.batch_std + self.eps)
        return (g * self.h).clamp(-1.0, 1.0)

    def target_logit(self, cos_target: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Margined (unscaled) target cosine: cos(theta - m*g) - (m + m*g)."""
        theta = torch.acos(cos_target.clamp(-1 + 1e-7, 1 - 1e-7))
        theta_m = (theta - self.m * g).clamp(1e-7, math.pi - 1e-7)
        return torch.cos(theta_m) - (self.m + self.m * g)


class PartialFCAdaFace(nn.Module):
    """Class-centre classifier + AdaFace softmax loss, sharded over ranks with class-centre sampling.

    ``forward(embeddings, labels) -> (loss, stats)``; `embeddings` are raw (un-normalised) model outputs of the
    local batch, `labels` the global identity labels (0..num_classes-1).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        sample_rate: float = 1.0,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        seed: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        rank, world = _world()
        self.num_classes, self.rank, self.world = num_classes, rank, world
        per = math.ceil(num_classes / world)
        self.class_start = min(num_classes, rank * per)
        self.num_local = min(num_classes, self.class_start + per) - self.class_start
        self.sample_rate = sample_rate
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, dim)))
        self.margin = AdaFaceMargin(s, m, h, t_alpha)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def _sample(self, local_labels: torch.Tensor, is_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the sampled local centres (positives first) and each gathered label's index among them
        (-1 for labels held by another rank)."""
        device = local_labels.device
        n_sample = max(1, int(round(self.sample_rate * self.num_local)))
        positives = torch.unique(local_labels[is_local])
        if n_sample >= self.num_local or positives.numel() >= n_sample:
            index = (torch.arange(self.num_local, device=device) if n_sample >= self.num_local else positives)
        else:
            score = torch.rand(self.num_local, generator=self.generator).to(device)
            score[positives] = 2.0  # positives always sampled
            index = torch.topk(score, n_sample).indices.sort().values
        remap = torch.full((self.num_local,), -1, dtype=torch.long, device=device)
        remap[index] = torch.arange(index.numel(), device=device)
        target = torch.where(is_local, remap[local_labels.clamp(0, self.num_local - 1)], torch.full_like(local_labels, -1))
        return index, target

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        emb = embeddings.float()
        if self.world > 1:
            # DDP averages backbone gradients over ranks, but each rank's embeddings already receive the full
            # gradient of the global loss through the all-gather: undo the averaging for this branch.
            emb.register_hook(lambda g: g * self.world)
        all_emb = _gather(emb)
        all_labels = _gather(labels.long())
        if (all_labels < 0).any() or (all_labels >= self.num_classes).any():
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {all_labels.min()}..{all_labels.max()}")
        norms = all_emb.norm(dim=1, keepdim=True)
        unit = all_emb / norms.clamp_min(1e-6)
        local = all_labels - self.class_start
        is_local = (local >= 0) & (local < self.num_local)
        index, target = self._sample(local, is_local)
        weight = F.normalize(self.weight[index], dim=1)
        cos = (unit @ weight.t()).clamp(-1.0, 1.0)  # (N, K) over the sampled local centres
        g = self.margin.margin_scaler(norms.squeeze(1))
        rows = torch.nonzero(target >= 0).squeeze(1)
        logits = cos.clone()
        if rows.numel():
            logits[rows, target[rows]] = self.margin.target_logit(cos[rows, target[rows]], g[rows])
        logits = logits * self.margin.s
        # Softmax cross-entropy over classes spread across ranks: shared max, summed partition and target.
        with torch.no_grad():
            row_max = logits.max(dim=1).values
            if self.world > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max[:, None]
        denom = _sum(shifted.exp().sum(dim=1))
        tgt = torch.zeros_like(row_max)
        if rows.numel():
            tgt = tgt.index_put((rows,), shifted[rows, target[rows]])
        tgt = _sum(tgt)
        loss = (denom.log() - tgt).mean()
        with torch.no_grad():
            # Share of the batch whose best-scoring sampled centre is its own (over this rank's centres only).
            hits = torch.zeros((), device=cos.device)
            if rows.numel():
                hits = (cos[rows].argmax(dim=1) == target[rows]).float().sum()
            if self.world > 1:
                dist.all_reduce(hits)
        stats = {
            "norm_mean": float(norms.detach().mean()),
            "ada_mu": float(self.margin.batch_mean),
            "train_acc": float(hits) / max(1, len(all_labels)),
            "sampled_classes": int(index.numel()),
        }
        return loss, stats
