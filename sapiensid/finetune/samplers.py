"""P x K batch samplers over a :class:`~sapiensid.finetune.data.DomainDataset`.

* ``random``: P identities, K images each drawn from all of the identity's images, whatever their domain
  (a batch may hold no cross-domain positive at all);
* ``domain_aware``: P identities, K images *from every domain* each (P x K x D): every sampled identity brings
  every domain it has, so batch-hard mining always sees cross-domain positives and within-domain negatives.

Identities are drawn without replacement within a batch (with replacement only when P exceeds the identity
count); images without replacement within a cell unless it holds fewer than K. The batch of step ``t`` depends
only on ``(seed, t)``: the sampler is deterministic and needs no state of its own to resume, the trainer's
step is enough.
"""

from __future__ import annotations

import numpy as np

from sapiensid.finetune.data import DomainDataset

SAMPLERS = ("random", "domain_aware")


class PKSampler:
    def __init__(self, dataset: DomainDataset, p: int, k: int, kind: str = "domain_aware", seed: int = 0):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")
        if p < 2 or k < 1:
            raise ValueError(f"P x K sampling needs P >= 2 identities and K >= 1 images, got P={p}, K={k}")
        if dataset.num_classes < 2:
            raise ValueError("P x K sampling needs at least 2 identities")
        self.dataset, self.p, self.k, self.kind, self.seed = dataset, p, k, kind, seed
        self.by_identity = [np.flatnonzero(dataset.labels == lab) for lab in range(dataset.num_classes)]

    @property
    def batch_size(self) -> int:
        return self.p * self.k * (len(self.dataset.domains) if self.kind == "domain_aware" else 1)

    @staticmethod
    def _take(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
        return rng.choice(pool, size=k, replace=len(pool) < k)

    def batch(self, step: int) -> np.ndarray:
        """Dataset indices of the batch of `step` (identity-major order)."""
        rng = np.random.default_rng((self.seed, step, 7))
        n = self.dataset.num_classes
        ids = rng.choice(n, size=self.p, replace=self.p > n)
        out = []
        for lab in ids:
            if self.kind == "random":
                out.append(self._take(rng, self.by_identity[lab], self.k))
                continue
            for cell in self.dataset.cells[lab]:
                if len(cell):  # an identity kept without some domain brings the domains it has
                    out.append(self._take(rng, cell, self.k))
        return np.concatenate(out)
