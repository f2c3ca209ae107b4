"""The cross-identity merge as planned passes: a distributed exact search on identity centres.

Issue #13 item 1. The names pass (pipeline/clean/partition.py) leaves, per faces shard, the weighted
feature sum and image count of every identity (`centers-<shard>.parquet`), and `blocks.json`: the shards
cut into blocks of at most `clean.block_size` identities (shards sharing a name stay in one block, so a
block holds whole identity sums). The merge fixpoint of `merge_centers` (pipeline/clean/merge.py) then
runs as rounds of passes on the executor, each unit a Ray task (or local) that reads its blocks from
storage and returns only the pairs it found:

- round 0 (`SearchStage`): one unit per tile (block a, block b >= a); the unit sums its blocks' centres
  and commits the pairs with cosine > `ambiguous` (identity strings, cosine, image counts). Work is the
  K^2/2 products of the exact search, spread over the cluster; memory per unit is two blocks.
- `finish` of a round (driver): the pairs of this round plus the pairs carried from the last one; if
  none is above `merge`, the fixpoint is reached: the ambiguous rule picks the losers and `merge.json`
  holds the decisions. Else connected components (scipy) of the pairs above `merge` merge identities
  (the representative has most images, then the smallest id), exactly the rules of `merge_centers`;
  pairs touching a merged identity are dropped (they are searched again), the others carried, and
  `round.json` names the merged identities.
- round k > 0: `GatherStage` (one unit per block) sums the members of every merged identity so far
  (partial sums per block); `SearchStage` searches only the identities changed in round k-1 against
  the unmerged identities of each block (one unit per block) and against the other merged identities
  (one unit). Unchanged pairs keep their cosines, so the union is the full search of `merge_centers`.

The driver holds the plan, the found pairs (pairs above `ambiguous`: a small share of K^2) and the merge
map, never a matrix of centres.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from pipeline import storage
from pipeline.clean.search import pairs_above, pairs_between
from pipeline.clean.select import resolve_thresholds
from pipeline.clean.state import normalise
from pipeline.config import CleanConfig
from pipeline.shards import DatasetDir, format_shard_id
from pipeline.stage import (
    FinishResult,
    PlanContext,
    PlannedStage,
    UnitContext,
    UnitResult,
    WorkUnit,
    config_hash,
)
from schemas.base import TableSchema

PAIRS = TableSchema("clean_pairs", 1, pa.schema([
    pa.field("a", pa.string(), nullable=False),  # a < b (string order)
    pa.field("b", pa.string(), nullable=False),
    pa.field("cos", pa.float32(), nullable=False),
    pa.field("count_a", pa.int64(), nullable=False),
    pa.field("count_b", pa.int64(), nullable=False),
]))

SUMS = TableSchema("clean_center_sums", 1, pa.schema([
    pa.field("identity", pa.string(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
    pa.field("sum", pa.list_(pa.float32()), nullable=False),
]))


def clean_hash(cfg: CleanConfig, **extra: object) -> str:
    """The hash of a clean pass's config: the clean section plus what else the pass depends on."""
    return config_hash({"clean": cfg.model_dump(mode="json"), **extra})


def centers_file(shard_id: str) -> str:
    return f"centers-{shard_id}.parquet"


def sums_table(names: list[str], sums: np.ndarray, counts: np.ndarray) -> pa.Table:
    return pa.table({"identity": pa.array(names, type=pa.string()),
                     "count": pa.array(np.asarray(counts, dtype=np.int64)),
                     "sum": pa.array(list(np.asarray(sums, dtype=np.float32)), type=pa.list_(pa.float32()))},
                    schema=SUMS.schema)


def group_sums(tables: list[pa.Table]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(identities sorted, summed `sum`, summed `count`) over tables of the SUMS schema, in table order."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return [], np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    t = pa.concat_tables(tables)
    names, inverse = np.unique(np.asarray(t.column("identity").to_pylist(), dtype=object), return_inverse=True)
    flat = np.asarray(pc.list_flatten(t.column("sum")).to_numpy(zero_copy_only=False), dtype=np.float32)
    vecs = flat.reshape(t.num_rows, -1)
    sums = np.zeros((len(names), vecs.shape[1]), dtype=np.float32)
    np.add.at(sums, inverse, vecs)
    counts = np.bincount(inverse, weights=np.asarray(t.column("count")), minlength=len(names)).astype(np.int64)
    return [str(n) for n in names], sums, counts


def read_center_files(d: DatasetDir, shards: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    return [pq.read_table(io.BytesIO(storage.get_bytes(d.join(centers_file(s)))), columns=columns)
            for s in shards]


def block_sums(names_dir: DatasetDir, shards: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    return group_sums(read_center_files(names_dir, shards))


def make_blocks(groups: list[tuple[list[str], int]], block: int) -> list[list[str]]:
    """Consecutive name groups (shards, identities) packed into blocks of at most `block` identities
    (a larger group is a block of its own)."""
    blocks: list[list[str]] = []
    size = 0
    for shards, n in groups:
        if not blocks or (size + n > block and size > 0):
            blocks.append([])
            size = 0
        blocks[-1].extend(shards)
        size += n
    return [b for b in blocks if b]


def _pairs_table(qn: list[str], qc: np.ndarray, bn: list[str], bc: np.ndarray,
                 i: np.ndarray, j: np.ndarray, s: np.ndarray) -> pa.Table:
    a = np.asarray(qn, dtype=object)[i] if len(i) else np.zeros(0, dtype=object)
    b = np.asarray(bn, dtype=object)[j] if len(j) else np.zeros(0, dtype=object)
    ca, cb = np.asarray(qc)[i], np.asarray(bc)[j]
    swap = b < a if len(a) else np.zeros(0, dtype=bool)
    a2, b2 = np.where(swap, b, a), np.where(swap, a, b)
    ca2, cb2 = np.where(swap, cb, ca), np.where(swap, ca, cb)
    return pa.table({"a": pa.array(a2.tolist(), type=pa.string()), "b": pa.array(b2.tolist(), type=pa.string()),
                     "cos": pa.array(np.asarray(s, dtype=np.float32)),
                     "count_a": pa.array(ca2.astype(np.int64)), "count_b": pa.array(cb2.astype(np.int64))},
                    schema=PAIRS.schema)


def _embedder(names_dir: DatasetDir) -> str | None:
    return names_dir.read_json("stats.json").get("embedder")


class _RoundStage(PlannedStage):
    """A pass of one merge round: its number is part of the config hash (each round has its own output)."""

    def __init__(self, config: CleanConfig, round_no: int = 0):
        super().__init__(config)
        self.round_no = round_no

    def config_hash(self) -> str:
        return clean_hash(self.config, round=self.round_no)


class SearchStage(_RoundStage):
    """One round of the merge search (see the module doc); the output holds the pairs found."""

    name = "clean_search"
    output_schema = PAIRS
    sort_keys = ("a", "b")


    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        blocks = ctx.inputs["names"].read_json("blocks.json")["blocks"]
        per_block = 2 * self.config.block_size * 2048 + (256 << 20)  # two blocks at 512-d float32 + a tile
        if self.round_no == 0:
            tiles = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks))]
            return [WorkUnit(format_shard_id(k), {"q": a, "b": b}, memory=per_block)
                    for k, (a, b) in enumerate(tiles)]
        units = [WorkUnit(format_shard_id(k), {"b": k}, memory=per_block) for k in range(len(blocks))]
        units.append(WorkUnit(format_shard_id(len(blocks)), {"merged": True}, memory=per_block))
        return units

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        # The unit's own clocks, so the search rate can be read per CPU second whatever else holds the
        # machine (benchmarks/clean_scale.py): wall and process CPU time of the whole unit, products done.
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = self._search_unit(unit, ctx)
        result.extra_stats.update({"unit_wall_seconds": round(time.perf_counter() - wall0, 4),
                                   "unit_cpu_seconds": round(time.process_time() - cpu0, 4),
                                   "products": int(result.extra_stats.pop("_products", 0))})
        return result

    def _search_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        names_dir = ctx.inputs["names"]
        thr = resolve_thresholds(self.config, _embedder(names_dir))
        blocks = names_dir.read_json("blocks.json")["blocks"]
        bs = self.config.block_size
        p = unit.payload
        if self.round_no == 0:
            qn, qx, qc = block_sums(names_dir, blocks[p["q"]])
            if p["q"] == p["b"]:
                qx = normalise(qx)
                i, j, s = pairs_above(qx, thr.ambiguous, bs)
                table = _pairs_table(qn, qc, qn, qc, i, j, s)
                products = len(qn) * (len(qn) - 1) // 2
            else:
                bn, bx, bc = block_sums(names_dir, blocks[p["b"]])
                i, j, s = pairs_between(normalise(qx), normalise(bx), thr.ambiguous, bs)
                table = _pairs_table(qn, qc, bn, bc, i, j, s)
                products = len(qn) * len(bn)
            return UnitResult(table, rows_in=len(qn), extra_stats={"_products": products})
        state = ctx.inputs["state"].read_json("round.json")
        into, reps, changed = state["into"], set(state["reps"]), set(state["changed"])
        gather = ctx.inputs["gather"]
        mn, mx, mc = group_sums([gather.read_shard(s) for s in gather.done_ids()])
        mx = normalise(mx)
        is_changed = np.asarray([n in changed for n in mn], dtype=bool)
        q = np.flatnonzero(is_changed)
        qn, qx, qc = [mn[int(k)] for k in q], mx[q], mc[q]
        if p.get("merged"):
            # Changed identities against each other (once) and against the unchanged merged ones.
            i, j, s = pairs_above(qx, thr.ambiguous, bs)
            parts = [_pairs_table(qn, qc, qn, qc, i, j, s)]
            r = np.flatnonzero(~is_changed)
            i, j, s = pairs_between(qx, mx[r], thr.ambiguous, bs)
            parts.append(_pairs_table(qn, qc, [mn[int(k)] for k in r], mc[r], i, j, s))
            return UnitResult(pa.concat_tables(parts), rows_in=len(mn))
        bn, bx, bc = block_sums(names_dir, blocks[p["b"]])
        # The block's identities that were never merged (merged ones are searched through the gather).
        single = np.asarray([n not in into and n not in reps for n in bn], dtype=bool)
        keep = np.flatnonzero(single)
        i, j, s = pairs_between(qx, normalise(bx[keep]) if len(keep) else np.zeros((0, qx.shape[1])),
                                thr.ambiguous, bs)
        table = _pairs_table(qn, qc, [bn[int(k)] for k in keep], bc[keep], i, j, s)
        return UnitResult(table, rows_in=len(keep))

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        names_dir = ctx.inputs["names"]
        thr = resolve_thresholds(self.config, _embedder(names_dir))
        found = [ctx.output.read_shard(s) for s in ctx.output.done_ids()]
        if self.round_no == 0:
            prev = {"into": {}, "reps": [], "rounds": 0, "merged": 0}
        else:
            prev = ctx.inputs["state"].read_json("round.json")
            found.append(pq.read_table(io.BytesIO(storage.get_bytes(ctx.inputs["state"].join("carried.parquet")))))
        pairs = pa.concat_tables([t.select(PAIRS.schema.names) for t in found]) if found else \
            PAIRS.schema.empty_table()
        decision = merge_round(pairs, thr.merge, prev)
        files = {"round.json": json.dumps(decision["state"], sort_keys=True).encode()}
        if decision["done"]:
            files["merge.json"] = json.dumps(decision["merge"], sort_keys=True).encode()
        else:
            buf = io.BytesIO()
            pq.write_table(decision["carried"], buf)
            files["carried.parquet"] = buf.getvalue()
        return FinishResult(files=files, stats={"round": self.round_no, "pairs": pairs.num_rows,
                                                "done": decision["done"]})


def merge_round(pairs: pa.Table, merge: float, prev: dict) -> dict:
    """One decision of the fixpoint on the current pairs (all pairs above `ambiguous` of the current
    identities): components of the pairs above `merge`, or, when there is none, the ambiguous losers."""
    into: dict[str, str] = dict(prev["into"])
    reps = set(prev["reps"])
    a = np.asarray(pairs.column("a").to_pylist(), dtype=object)
    b = np.asarray(pairs.column("b").to_pylist(), dtype=object)
    cos = pairs.column("cos").to_numpy()
    ca, cb = pairs.column("count_a").to_numpy(), pairs.column("count_b").to_numpy()
    strong = cos > merge
    if not strong.any():
        losers: set[str] = set()
        lost = 0
        for x, y, cx, cy in zip(a.tolist(), b.tolist(), ca.tolist(), cb.tolist()):
            loser, n = (x, cx) if (cx < cy or (cx == cy and x > y)) else (y, cy)
            if loser not in losers:
                losers.add(loser)
                lost += int(n)
        report = {"merge_rounds": prev["rounds"], "identities_merged_away": prev["merged"],
                  "ambiguous_pairs": int(len(a)), "ambiguous_identities_dropped": len(losers),
                  "ambiguous_images_dropped": lost}
        return {"done": True, "merge": {"into": into, "losers": sorted(losers), "report": report},
                "state": {**prev, "done": True}}
    ends, inverse = np.unique(np.concatenate([a[strong], b[strong]]), return_inverse=True)
    m = int(strong.sum())
    graph = sp.csr_matrix((np.ones(m), (inverse[:m], inverse[m:])), shape=(len(ends), len(ends)))
    _, comp = connected_components(graph, directed=False)
    count = {}
    for x, y, cx, cy in zip(a[strong].tolist(), b[strong].tolist(), ca[strong].tolist(), cb[strong].tolist()):
        count[x], count[y] = int(cx), int(cy)
    changed: set[str] = set()
    merged = 0
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.r_[True, comp[order][1:] != comp[order][:-1]])
    for members in np.split(order, bounds[1:]):
        names = [str(ends[int(k)]) for k in members]
        rep = min(names, key=lambda n: (-count[n], n))
        for n in names:
            if n != rep:
                into[n] = rep
                reps.discard(n)
        reps.add(rep)
        changed.add(rep)
        merged += len(names) - 1
    for k in list(into):  # chains (x into y, y now into z) end at the final identity
        t = into[k]
        while t in into:
            t = into[t]
        into[k] = t
    touched = set(ends.tolist())
    carry = np.asarray([x not in touched and y not in touched for x, y in zip(a.tolist(), b.tolist())],
                       dtype=bool)
    state = {"done": False, "into": into, "reps": sorted(reps), "changed": sorted(changed),
             "rounds": prev["rounds"] + 1, "merged": prev["merged"] + merged}
    return {"done": False, "state": state, "carried": pairs.filter(pa.array(carry))}


class GatherStage(_RoundStage):
    """Sums of every merged identity, one unit per block (partial sums over the block's shards)."""

    name = "clean_gather"
    output_schema = SUMS
    sort_keys = ("identity",)


    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        blocks = ctx.inputs["names"].read_json("blocks.json")["blocks"]
        return [WorkUnit(format_shard_id(k), {"b": k}, memory=self.config.block_size * 4096 + (128 << 20))
                for k in range(len(blocks))]

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        names_dir = ctx.inputs["names"]
        state = ctx.inputs["state"].read_json("round.json")
        into, reps = state["into"], set(state["reps"])
        blocks = names_dir.read_json("blocks.json")["blocks"]
        bn, bx, bc = block_sums(names_dir, blocks[unit.payload["b"]])
        target = [into.get(n, n) for n in bn]
        keep = [k for k, t in enumerate(target) if t in reps]
        if not keep:
            return UnitResult(SUMS.schema.empty_table(), rows_in=len(bn))
        part = sums_table([target[k] for k in keep], bx[keep], bc[keep])
        tn, tx, tc = group_sums([part])
        return UnitResult(sums_table(tn, tx, tc), rows_in=len(bn))


def run_merge(executor, cfg: CleanConfig, names_uri: str, root: str, overwrite: bool) -> str:
    """The rounds of the merge on `executor`, under `root`/r<k> and `root`/g<k>; returns the directory
    holding `merge.json` (the last round)."""
    k = 0
    out = storage.join(root, "r0")
    executor.run(SearchStage(cfg, 0), {"names": names_uri}, out, overwrite)
    while not DatasetDir(out).read_json("round.json")["done"]:
        k += 1
        gather = storage.join(root, f"g{k}")
        executor.run(GatherStage(cfg, k), {"names": names_uri, "state": out}, gather, overwrite)
        nxt = storage.join(root, f"r{k}")
        executor.run(SearchStage(cfg, k), {"names": names_uri, "state": out, "gather": gather}, nxt, overwrite)
        out = nxt
    return out
