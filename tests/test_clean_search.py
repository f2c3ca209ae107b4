"""The blocked similarity search gives exactly the brute-force answer, whatever the tiling."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.clean.search import best_match, pairs_above
from pipeline.clean.state import normalise


@pytest.mark.parametrize("block", [1, 3, 7, 10_000])
def test_pairs_and_best_match_match_brute_force(block):
    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((40, 8)))
    sims = x @ x.T
    i, j, s = pairs_above(x, 0.3, block)
    want = [(a, b) for a in range(40) for b in range(a + 1, 40) if sims[a, b] > 0.3]
    assert list(zip(i.tolist(), j.tolist())) == want
    assert np.allclose(s, [sims[a, b] for a, b in want], atol=1e-6)

    q = normalise(rng.standard_normal((13, 8)))
    best, arg = best_match(q, x, block)
    assert np.array_equal(arg, (q @ x.T).argmax(axis=1))
    assert np.allclose(best, (q @ x.T).max(axis=1), atol=1e-6)
    empty, none = best_match(q, x[:0], block)
    assert np.isneginf(empty).all() and (none == -1).all()
