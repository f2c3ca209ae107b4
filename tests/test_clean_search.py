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


def _names_dir(root, sums: np.ndarray, counts: np.ndarray, names: list[str], per_shard: int, block: int):
    """A names-pass output as the merge rounds read it: centre files per shard, blocks.json, stats.json."""
    import io

    import pyarrow.parquet as pq

    from pipeline.clean.cross import make_blocks, sums_table
    from pipeline.shards import DatasetDir

    d = DatasetDir(root)
    d.root.mkdir(parents=True)
    groups = []
    for k, start in enumerate(range(0, len(names), per_shard)):
        sl = slice(start, start + per_shard)
        buf = io.BytesIO()
        pq.write_table(sums_table(names[sl], sums[sl], counts[sl]), buf)
        d.put(f"centers-{k:05d}.parquet", buf.getvalue())
        groups.append(([f"{k:05d}"], len(names[sl])))
    d.write_json("blocks.json", {"blocks": make_blocks(groups, block)})
    d.write_json("stats.json", {"embedder": "kprpe"})
    return d


def _chains(rng, dim: int, n: int) -> np.ndarray:
    """Triples (u, v, c): u.v = 0.75 (merged in round 1), c at 0.66 to u and to v (ambiguous band) but at
    0.706 to their mean (merged only in round 2); plus strangers."""
    out = []
    for _ in range(n):
        basis = np.linalg.qr(rng.standard_normal((dim, 3)))[0].T
        t = np.arccos(0.75)
        u, v = basis[0], np.cos(t) * basis[0] + np.sin(t) * basis[1]
        m = normalise((u + v)[None])[0]
        c = 0.706 * m + np.sqrt(1 - 0.706 ** 2) * basis[2]
        out += [u, v, c]
    return np.asarray(out)


@pytest.mark.parametrize("block", [4, 1000])
def test_distributed_merge_rounds_equal_the_one_process_merge(tmp_path, block):
    """Tiles over several blocks and rounds after the first reach what merge_centers reaches."""
    from pipeline.clean.cross import run_merge
    from pipeline.clean.merge import merge_centers
    from pipeline.config import CleanConfig
    from pipeline.executors import make_executor
    from pipeline.shards import DatasetDir

    rng = np.random.default_rng(3)
    vecs = np.concatenate([_chains(rng, 32, 4), normalise(rng.standard_normal((8, 32)))])
    order = rng.permutation(len(vecs))  # chain members land in different shards and blocks
    vecs = vecs[order]
    counts = rng.integers(1, 9, len(vecs))
    sums = (vecs * counts[:, None]).astype(np.float32)
    names = [f"id{k:03d}" for k in range(len(vecs))]
    cfg = CleanConfig(block_size=block)
    d = _names_dir(tmp_path / "names", sums, counts, names, per_shard=3, block=block)
    got = DatasetDir(run_merge(make_executor("local"), cfg, d.uri, str(tmp_path / "merge"), False))
    merge = got.read_json("merge.json")
    into, losers, report = merge_centers(names, sums, counts, 0.7, 0.6, block)
    assert merge["into"] == into and set(merge["losers"]) == losers and merge["report"] == report
    # Round 1 merges the four (u, v); round 2 at least one c (weighted means move with the counts).
    assert report["merge_rounds"] == 2 and report["identities_merged_away"] >= 5
