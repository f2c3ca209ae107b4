"""Fine-tuning losses: a classification term (AdaFace or plain cross-entropy) plus batch-hard triplet.

Batch-hard triplet (Hermans et al. 2017) on L2-normalised embeddings with Euclidean distance: for each anchor
the farthest positive and the closest negative of the batch, ``relu(d(a, p) - d(a, n) + margin)``; margin 0
and weight 1 by default (the published cross-domain recipe). Mining statistics, logged per step:

* ``hard_pos_cross_domain``: share of anchors whose hardest positive lies in another domain;
* ``hard_neg_same_domain``: share of anchors whose hardest negative lies in the anchor's own domain;
* ``triplet_active``: share of anchors with a positive loss term.

A domain-aware batch gives a model that has not yet bridged domains hardest positives across domains and
hardest negatives within a domain: both shares near 1 show the loss is working on the domain gap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sapiensid.loss import PartialFCAdaFace

CLASSIFIERS = ("adaface", "ce", "none")


def batch_hard_triplet(
    embeddings: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, margin: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    unit = F.normalize(embeddings.float(), dim=1)
    dist = torch.cdist(unit, unit).clamp_min(0)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    has = pos.any(dim=1) & neg.any(dim=1)
    if not bool(has.any()):
        raise ValueError("batch-hard triplet needs, for some anchor, another image of its identity and one of "
                         "another identity (use a P x K sampler with K >= 2 or several domains)")
    d_pos, i_pos = dist.masked_fill(~pos, -1.0).max(dim=1)
    d_neg, i_neg = dist.masked_fill(~neg, float("inf")).min(dim=1)
    terms = F.relu(d_pos - d_neg + margin)[has]
    with torch.no_grad():
        dom = domains[has]
        stats = {
            "triplet_active": float((terms > 0).float().mean()),
            "hard_pos_cross_domain": float((domains[i_pos][has] != dom).float().mean()),
            "hard_neg_same_domain": float((domains[i_neg][has] == dom).float().mean()),
            "d_pos": float(d_pos[has].mean()),
            "d_neg": float(d_neg[has].mean()),
        }
    return terms.mean(), stats


class FinetuneLoss(nn.Module):
    """``cls_weight * classification + triplet_weight * batch-hard triplet``; `forward` returns (loss, stats)."""

    def __init__(self, num_classes: int, dim: int, classifier: str = "ce", cls_weight: float = 1.0,
                 triplet_margin: float = 0.0, triplet_weight: float = 1.0, adaface_m: float = 0.4,
                 adaface_s: float = 64.0, seed: int = 0):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; use one of {CLASSIFIERS}")
        if classifier == "none" and triplet_weight <= 0:
            raise ValueError("no classifier and no triplet term: nothing to train")
        self.classifier, self.cls_weight = classifier, cls_weight
        self.margin, self.triplet_weight = triplet_margin, triplet_weight
        self.head: nn.Module | None = None
        if classifier == "adaface":
            self.head = PartialFCAdaFace(num_classes, dim, 1.0, adaface_s, adaface_m, seed=seed)
        elif classifier == "ce":
            # BNNeck-style: batch norm before a bias-free linear classifier (the ReID baseline of Luo et al.)
            self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes, bias=False))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor, dict]:
        stats: dict[str, float] = {}
        loss = emb.new_zeros(())
        if self.classifier == "adaface":
            assert self.head is not None
            cls, s = self.head(emb, labels)
            stats.update({"cls_loss": float(cls.detach()), "train_acc": s["train_acc"]})
            loss = loss + self.cls_weight * cls
        elif self.classifier == "ce":
            assert self.head is not None
            logits = self.head(emb.float())
            cls = F.cross_entropy(logits, labels)
            stats.update({"cls_loss": float(cls.detach()),
                          "train_acc": float((logits.argmax(1) == labels).float().mean())})
            loss = loss + self.cls_weight * cls
        if self.triplet_weight > 0:
            tri, s = batch_hard_triplet(emb, labels, domains, self.margin)
            stats.update({"triplet_loss": float(tri.detach()), **s})
            loss = loss + self.triplet_weight * tri
        return loss, stats
