"""The partitioned clean: per-name steps as one work unit per faces shard, cross-identity steps on centers.

Issue #13 item 1. The single-process stage (pipeline/clean/stage.py) holds every feature in one process;
this module splits the same computation along what it depends on:

- Pass "names" (`NamesStage`, a `PlannedStage`: one unit per faces shard, run by the executor as Ray
  tasks or locally): copies of one photo, per-name DBSCAN + top-k + one detection per photo, and the
  face-score filter only ever look at the rows of one name. The query packs all URLs of a name into one
  manifest shard and every later stage keeps shard ids, so a faces shard normally holds whole names and
  a unit reads its own shard only. When names do span shards (hand-made inputs, a re-sharded directory),
  `plan` joins the shards sharing a name into a group (connected components over shared names); every
  unit of a group reads the whole group, computes the same per-name result and commits the rows of its
  own shard, so the verdicts do not depend on the sharding. A unit's output is a CLEAN table of its rows
  (the identity before merging) plus `centers-<shard>.parquet`: per identity, its image count and its
  weighted feature sum over this shard's rows (sums of shards add up to the identity's sum).
- The cross-identity merge (`merge_centers`, pipeline/clean/merge.py) then needs only those sums, one
  per identity, gathered from the units' files: exact tiled search (pipeline/clean/search.py) and
  connected components (scipy.sparse.csgraph).

Memory of a unit is its name group's features (plus the DBSCAN graph of one block of names), whatever
the dataset's size; the driver holds the plan (shard ids) and then the centers only.
"""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import storage
from pipeline.clean.cluster import cluster_names
from pipeline.clean.copies import collapse_copies
from pipeline.clean.load import load_faces
from pipeline.clean.merge import identity_sums, merge_centers
from pipeline.clean.select import identity_strings, resolve_thresholds
from pipeline.config import CleanConfig
from pipeline.shards import DatasetDir
from pipeline.stage import PlanContext, PlannedStage, UnitContext, UnitResult, WorkUnit
from schemas.clean import CLEAN

log = logging.getLogger(__name__)

CENTERS_SCHEMA = pa.schema([
    pa.field("identity", pa.string(), nullable=False),
    pa.field("count", pa.int64(), nullable=False),
    pa.field("sum", pa.list_(pa.float32()), nullable=False),
])


def centers_file(shard_id: str) -> str:
    return f"centers-{shard_id}.parquet"


def name_groups(faces: DatasetDir) -> list[list[str]]:
    """Finished faces shards joined when they share a name (`label`): connected components, each sorted.

    Reads the label column only; with name-aligned shards (the normal build) every group is one shard.
    """
    ids = faces.done_ids()
    index: dict[str, int] = {}
    rows, cols = [], []
    for k, sid in enumerate(ids):
        for label in pc.unique(faces.read_shard(sid, columns=["label"]).column("label")).to_pylist():
            rows.append(k)
            cols.append(index.setdefault(label, len(index)))
    if not ids:
        return []
    # Bipartite shard x name incidence; shards are connected through the names they share.
    inc = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), max(1, len(index))))
    _, comp = connected_components(inc @ inc.T, directed=False)
    groups: dict[int, list[str]] = {}
    for k, c in enumerate(comp):
        groups.setdefault(int(c), []).append(ids[k])
    return [groups[c] for c in sorted(groups, key=lambda c: groups[c][0])]


def name_steps(state, cfg: CleanConfig, thr) -> dict:
    """Steps 0-2 of `clean_selection` (copies, per-name clustering, face score), in its order."""
    report = {"copies": collapse_copies(state, cfg.copy_hash_distance, 1.0 - thr.dbscan_eps)}
    report["cluster"] = cluster_names(state, thr.dbscan_eps, thr.dbscan_min_samples, cfg.top_k_clusters,
                                      cfg.dbscan_pair_budget, cfg.tie_share)
    report["face_score"] = {"dropped": state.drop(~(state.face_score > cfg.face_score), "low_face_score")}
    return report


class NamesStage(PlannedStage):
    """Pass "names": per-name steps, one unit per faces shard (see the module doc)."""

    name = "clean_names"
    output_schema = CLEAN
    sort_keys = ("person_id",)

    def __init__(self, config: CleanConfig):
        super().__init__(config)

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        faces = ctx.inputs["faces"]
        units = []
        for group in name_groups(faces):
            rows = sum(faces.num_rows(s) for s in group)
            for sid in group:
                # Features as float16 and float32 copies plus the DBSCAN graph: ~8 KiB a row at 512-d.
                units.append(WorkUnit(sid, {"group": group}, memory=max(64 << 20, rows * 8192)))
        return sorted(units, key=lambda u: u.id)

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        group = list(unit.payload["group"])
        loaded = load_faces(ctx.inputs["faces"], ctx.inputs.get("persons"), ids=group)
        state = loaded.state
        thr = resolve_thresholds(self.config, loaded.embedder)
        report = name_steps(state, self.config, thr)
        k = group.index(unit.id)
        a, b = int(loaded.offsets[k]), int(loaded.offsets[k + 1])
        identity = identity_strings(state)
        kept = state.kept()
        pids = loaded.meta.column("person_id")
        dup = [pids[int(c)].as_py() if c >= 0 else None for c in state.copy_of[a:b]]
        table = (loaded.meta.slice(a, b - a)
                 .append_column("identity", pa.array(identity[a:b].tolist(), type=pa.string()))
                 .append_column("kept", pa.array(kept[a:b], type=pa.bool_()))
                 .append_column("reason", pa.array(state.reason[a:b].tolist(), type=pa.string()))
                 .append_column("duplicate_of", pa.array(dup, type=pa.string())))
        within = np.zeros(state.n, dtype=bool)
        within[a:b] = True
        ids, sums, counts = identity_sums(state, self.config.center_weighting, within)
        centers = pa.table({"identity": [state.names[int(i)] for i in ids], "count": counts.astype(np.int64),
                            "sum": pa.array(list(sums), type=pa.list_(pa.float32()))}, schema=CENTERS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(centers, buf)
        drops = Counter(r for r in state.reason[a:b].tolist() if r is not None)
        extra = {"embedder": loaded.embedder, "dim": loaded.dim, "group": group}
        if k == 0:  # the group's per-name report, counted once per group
            extra["group_report"] = report
        return UnitResult(table, rows_in=b - a, drops=drops, files={centers_file(unit.id): buf.getvalue()},
                          extra_stats=extra)


def gather_centers(names_out: DatasetDir) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(identities sorted, summed weighted features, image counts) from every unit's centers file."""
    tables = [pq.read_table(io.BytesIO(storage.get_bytes(names_out.join(centers_file(s)))))
              for s in names_out.done_ids()]
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


def merge_from_centers(names_out: DatasetDir, cfg: CleanConfig, embedder: str | None
                       ) -> tuple[dict[str, str], set[str], dict]:
    """The cross-identity merge on the gathered centers (see `merge_centers`)."""
    thr = resolve_thresholds(cfg, embedder)
    names, sums, counts = gather_centers(names_out)
    if not names:
        return {}, set(), {"merge_rounds": 0, "identities_merged_away": 0, "ambiguous_pairs": 0,
                           "ambiguous_identities_dropped": 0}
    return merge_centers(names, sums, counts, thr.merge, thr.ambiguous, cfg.block_size)
