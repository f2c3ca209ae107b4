"""Masked Recognition Model (MRM): token selection and the masking-rate rules exposed to the trainer.

Token selection (reference ``masked_sampling``): valid candidates come first in random order, then
invalid ones; the first ``n_keep`` are kept. In training ``n_keep`` is set by the trainer; at
evaluation every valid token is kept (the batch is padded to its longest sample, and padding tokens
are masked out of attention so embeddings do not depend on batch neighbours).

Rates (paper, section "Masked Recognition Model"; the official repo ships no training code, so the
exact use below is our reading of the paper and is documented in docs/model.md):

* eq. 6, variable keep count per step: ``n = n_k + (n_i - n_k) * exp(-lambda * u)``, ``u ~ U(0, 1)``,
  with ``n_i`` the number of candidates (432) and ``n_k`` the minimum kept.
* batch-size rule: attention memory grows like ``B * n^2``, so ``n_k^2`` is kept proportional to
  ``1 / B``: ``n_k(B) = n_k(B0) * sqrt(B0 / B)``.
* learning-rate rule matching it: the learning rate scales linearly with the batch size the keep count
  implies, ``lr = lr0 * B / B0 = lr0 * (n_k0 / n_k)^2``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class _UniformSource(Protocol):
    def random(self) -> float: ...


def variable_keep_count(n_total: int, n_min: int, lam: float, rng: _UniformSource) -> int:
    """Eq. 6: ``round(n_min + (n_total - n_min) * exp(-lam * u))`` with ``u = rng.random()``.

    ``rng`` is anything with ``.random()`` in [0, 1) (``random.Random``, ``numpy.random.Generator``).
    lam = 0 always keeps every token; larger lam concentrates near ``n_min`` (but never below
    ``n_min + (n_total - n_min) * exp(-lam)``).
    """
    if not 0 < n_min <= n_total:
        raise ValueError(f"need 0 < n_min <= n_total, got n_min={n_min}, n_total={n_total}")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    u = float(rng.random())
    n = n_min + (n_total - n_min) * math.exp(-lam * u)
    return int(min(n_total, max(n_min, round(n))))


def keep_count_for_batch(base_keep: int, base_batch: int, batch: int) -> int:
    """``n_k^2 * B`` constant: the keep count for ``batch`` given ``base_keep`` at ``base_batch``."""
    if base_keep <= 0 or base_batch <= 0 or batch <= 0:
        raise ValueError("keep counts and batch sizes must be positive")
    return max(1, int(round(base_keep * math.sqrt(base_batch / batch))))


def lr_for_keep(base_lr: float, base_keep: int, keep: int) -> float:
    """Learning rate for ``keep`` tokens when ``base_lr`` was tuned at ``base_keep``.

    With ``n_k^2 * B`` held constant the batch is ``B0 * (base_keep / keep)^2``; the learning rate follows
    the batch linearly.
    """
    if base_keep <= 0 or keep <= 0:
        raise ValueError("keep counts must be positive")
    return base_lr * (base_keep / keep) ** 2


def default_keep_count(n_total: int, mask_ratio: float) -> int:
    """The reference's fixed training count: ``int(n_total * (1 - mask_ratio))`` (146 for 432, 0.66)."""
    return int(n_total * (1 - mask_ratio))


def face_first_offsets(
    batch: int, per_level: int, has_body: torch.Tensor, prob: float, gen: torch.Generator | None = None
) -> torch.Tensor:
    """Score offsets (B, 3*per_level) that, with probability ``prob`` for samples with a body, keep
    whole-image tokens first and drop face tokens first (reference ``face_first_<p>``)."""
    dev = has_body.device
    use = (torch.rand(batch, generator=gen, device=dev) < prob) & has_body
    base = torch.tensor([-0.3, -0.2, -0.1], device=dev).repeat_interleave(per_level)
    return torch.where(use[:, None], base[None], torch.zeros_like(base)[None])


def select_tokens(
    valid: torch.Tensor,
    n_keep: int | None,
    training: bool,
    offsets: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose kept candidates. Returns ``ids_keep`` (B, n) and ``kept_valid`` (B, n) bool.

    Training: score = invalid + U(0, 0.001) [+ offsets]; ascending sort; keep ``n_keep`` (None: all valid).
    Evaluation (``n_keep`` None): keep all valid tokens in index order (deterministic), padding the batch
    to its largest count (at least one token).
    """
    b, n = valid.shape
    invalid = (~valid).float()
    if training:
        score = invalid + torch.rand(b, n, generator=gen, device=valid.device) * 0.001
        if offsets is not None:
            score = score + offsets
        order = torch.argsort(score, dim=1)
        # n_keep None in training: no MRM, every valid token (random order), batch padded like evaluation
        count = int(valid.sum(dim=1).max().clamp(min=1)) if n_keep is None else int(min(max(n_keep, 1), n))
    else:
        order = torch.argsort(invalid, dim=1, stable=True)
        count = int(valid.sum(dim=1).max().clamp(min=1)) if n_keep is None else int(min(max(n_keep, 1), n))
    ids = order[:, :count]
    return ids, torch.gather(valid, 1, ids)
