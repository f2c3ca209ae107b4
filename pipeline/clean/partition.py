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
- The cross-identity merge then needs only those sums: rounds of planned passes (pipeline/clean/cross.py)
  whose units read blocks of centre files and return the pairs found (exact tiled search,
  pipeline/clean/search.py), with connected components (scipy.sparse.csgraph) in each round's finish.
- Pass "dedup" applies the merge, drops near-duplicates and decides validation overlap per identity (a
  unit holds every row of its identities); pass "select" writes the verdicts.

Memory of a unit is its name group's features (plus the DBSCAN graph of one block of names), or two
blocks of centres, whatever the dataset's size; the driver holds the plan, the pairs found and the maps.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import storage
from pipeline.clean.cluster import cluster_names
from pipeline.clean.copies import collapse_copies
from pipeline.clean.cross import (
    centers_file,
    clean_hash,
    group_sums,
    make_blocks,
    read_center_files,
    run_merge,
    sums_table,
)
from pipeline.clean.dedup import drop_near_duplicates
from pipeline.clean.load import load_faces
from pipeline.clean.merge import identity_sums, merge_centers
from pipeline.clean.overlap import load_valsets, overlap_verdicts
from pipeline.clean.select import identity_strings, resolve_thresholds
from pipeline.clean.state import DROPPED
from pipeline.config import BuildConfig, CleanConfig
from pipeline.shards import DatasetDir, file_sha256
from pipeline.stage import FinishResult, PlanContext, PlannedStage, UnitContext, UnitResult, WorkUnit
from schemas.clean import CLEAN

log = logging.getLogger(__name__)

def name_groups(faces: DatasetDir) -> list[list[str]]:
    """Finished faces shards joined when they share a name (`label`): connected components, each sorted.

    Reads the label column only; with name-aligned shards (the normal build) every group is one shard.
    """
    ids = faces.done_ids()
    index: dict[str, int] = {}
    rows, cols = [], []
    for k, sid in enumerate(ids):
        for label in pc.unique(faces.read_shard(sid, columns=["source_label"]).column("source_label")).to_pylist():
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
    """Steps 0-2 of `clean_selection` (copies, per-name clustering, face score), in its order; the report
    carries the funnel rows of these rows (identities and images after each step). Names never span
    two groups, so the funnel rows of groups add up."""
    def by_label(step: str) -> dict:  # before clustering, identities are still the names
        kept = state.kept()
        return {"step": step, "identities": int(len(np.unique(state.label[kept]))), "images": int(kept.sum())}

    funnel = [by_label("input")]
    report: dict = {"copies": collapse_copies(state, cfg.copy_hash_distance, 1.0 - thr.dbscan_eps)}
    funnel.append(by_label("copies"))
    report["cluster"] = cluster_names(state, thr.dbscan_eps, thr.dbscan_min_samples, cfg.top_k_clusters,
                                      cfg.dbscan_pair_budget, cfg.tie_share)
    funnel.append(state.funnel_row("cluster"))
    report["face_score"] = {"dropped": state.drop(~(state.face_score > cfg.face_score), "low_face_score")}
    funnel.append(state.funnel_row("face_score"))
    report["funnel"] = funnel
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
        buf = io.BytesIO()
        pq.write_table(sums_table([state.names[int(i)] for i in ids], sums, counts), buf)
        drops = Counter(r for r in state.reason[a:b].tolist() if r is not None)
        extra = {"embedder": loaded.embedder, "dim": loaded.dim, "group": group, "identities": int(len(ids))}
        if k == 0:  # the group's per-name report, counted once per group
            extra["group_report"] = report
        return UnitResult(table, rows_in=b - a, drops=drops, files={centers_file(unit.id): buf.getvalue()},
                          extra_stats=extra)

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        """The per-name reports and the blocks of the merge search (`blocks.json`)."""
        return _names_finish(self, ctx, rollup)


def gather_centers(names_out: DatasetDir) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(identities sorted, summed weighted features, image counts) from every unit's centers file: all
    centres in one process (tests and the single-process measurements; the stage itself searches them
    in blocks, pipeline/clean/cross.py)."""
    return group_sums(read_center_files(names_out, names_out.done_ids()))


def merge_from_centers(names_out: DatasetDir, cfg: CleanConfig, embedder: str | None
                       ) -> tuple[dict[str, str], set[str], dict]:
    """The cross-identity merge on the gathered centers in one process (`merge_centers`): the reference
    the distributed rounds (pipeline/clean/cross.py) are tested against."""
    thr = resolve_thresholds(cfg, embedder)
    names, sums, counts = gather_centers(names_out)
    if not names:
        return {}, set(), {"merge_rounds": 0, "identities_merged_away": 0, "ambiguous_pairs": 0,
                           "ambiguous_identities_dropped": 0, "ambiguous_images_dropped": 0}
    return merge_centers(names, sums, counts, thr.merge, thr.ambiguous, cfg.block_size)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _first_embedder(d: DatasetDir) -> tuple[str | None, int]:
    for sid in d.done_ids():
        st = d.shard_stats(sid)
        if st.get("embedder"):
            return st["embedder"], int(st.get("dim", 0))
    return None, 0


def _sum_funnels(funnels: list[list[dict]]) -> list[dict]:
    out: dict[str, dict] = {}
    for funnel in funnels:
        for row in funnel:
            acc = out.setdefault(row["step"], {"step": row["step"], "identities": 0, "images": 0})
            acc["identities"] += row["identities"]
            acc["images"] += row["images"]
    return list(out.values())


def _sum_reports(reports: list[dict]) -> dict:
    """Numbers add up over groups; anything else (a `skipped` note) is kept as it is."""
    out: dict = {}
    for rep in reports:
        for k, v in rep.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    return out


def _names_finish(self: NamesStage, ctx: PlanContext, rollup: dict) -> FinishResult:
    """The per-name reports summed, and `blocks.json`: the shards cut into blocks of whole name groups of
    at most `block_size` identities, the tiles of the distributed merge search (pipeline/clean/cross.py)."""
    out = ctx.output
    embedder, dim = _first_embedder(out)
    stats_of = {sid: out.shard_stats(sid) for sid in out.done_ids()}
    reports = [st["group_report"] for st in stats_of.values() if "group_report" in st]
    steps = {name: _sum_reports([r[name] for r in reports]) for name in ("copies", "cluster", "face_score")}
    groups: dict[str, list[str]] = {}
    for sid, st in stats_of.items():
        groups.setdefault(st.get("group", [sid])[0], st.get("group", [sid]))
    sized = [(g, sum(int(stats_of[s].get("identities", 0)) for s in g)) for _, g in sorted(groups.items())]
    blocks = make_blocks(sized, self.config.block_size)
    stats = {"embedder": embedder, "dim": dim, "funnel": _sum_funnels([r["funnel"] for r in reports]),
             "steps": steps, "blocks": len(blocks)}
    return FinishResult(files={"blocks.json": _json_bytes({"blocks": blocks})}, stats=stats)


def _shard_identities(d: DatasetDir, sid: str) -> list[str]:
    blob = storage.get_bytes(d.join(centers_file(sid)))
    return pq.read_table(io.BytesIO(blob), columns=["identity"]).column("identity").to_pylist()


class _VerdictStage(PlannedStage):
    """A pass whose output is verdict rows (the CLEAN schema) and whose inputs include the validation files."""

    output_schema = CLEAN
    sort_keys = ("person_id",)

    def config_hash(self) -> str:
        return _with_valsets(self.config)


class DedupStage(_VerdictStage):
    """Pass "dedup": merged identities, the ambiguous rule, near-duplicates within an identity.

    One unit per shard; a unit reads the shards holding rows of the (merged) identities it holds (a group:
    connected components over shared identities; one shard unless a merge joined names of two shards)
    and commits its own rows with their post-dedup identity, plus the identity sums of its rows.
    """

    name = "clean_dedup"

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        names = ctx.inputs["names"]
        merge = ctx.inputs["merge"].read_json("merge.json")
        into, losers = merge["into"], set(merge["losers"])
        ids = names.done_ids()
        index: dict[str, int] = {}
        rows, cols = [], []
        for k, sid in enumerate(ids):
            for ident in _shard_identities(names, sid):
                final = into.get(ident, ident)
                if final not in losers:
                    rows.append(k)
                    cols.append(index.setdefault(final, len(index)))
        inc = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), max(1, len(index))))
        _, comp = connected_components(inc @ inc.T, directed=False)
        units = []
        for k, sid in enumerate(ids):
            group = [ids[m] for m in np.flatnonzero(comp == comp[k])]
            n = sum(names.num_rows(s) for s in group)
            units.append(WorkUnit(sid, {"group": group}, memory=max(64 << 20, n * 8192)))
        return units

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        group = list(unit.payload["group"])
        names = ctx.inputs["names"]
        merge = ctx.inputs["merge"].read_json("merge.json")
        into, losers = merge["into"], set(merge["losers"])
        loaded = load_faces(ctx.inputs["faces"], None, ids=group)
        state = loaded.state
        verdicts = pa.concat_tables([names.read_shard(s, columns=["person_id", "identity", "reason",
                                                                  "duplicate_of"]) for s in group])
        pos = np.asarray(pc.index_in(loaded.meta.column("person_id"), verdicts.column("person_id")))
        ident = [None if v is None else into.get(v, v) for v in verdicts.column("identity").to_pylist()]
        reason = verdicts.column("reason").to_pylist()
        ident = [None if v is None else v for v in ident]
        for m, v in enumerate(ident):
            if v is not None and v in losers:
                ident[m], reason[m] = None, "ambiguous_identity"
        ident_rows = np.asarray(ident, dtype=object)[pos]
        state.reason = np.asarray(reason, dtype=object)[pos]
        present = sorted({v for v in ident_rows.tolist() if v is not None})
        code = {v: c for c, v in enumerate(present)}
        state.names = present
        state.ident = np.asarray([DROPPED if v is None else code[v] for v in ident_rows], dtype=np.int64)
        thr = resolve_thresholds(self.config, loaded.embedder)
        dedup = drop_near_duplicates(state, thr.duplicate)
        k = group.index(unit.id)
        a, b = int(loaded.offsets[k]), int(loaded.offsets[k + 1])
        dup = verdicts.column("duplicate_of").take(pa.array(pos[a:b]))
        table = (loaded.meta.slice(a, b - a)
                 .append_column("identity", pa.array(identity_strings(state)[a:b].tolist(), type=pa.string()))
                 .append_column("kept", pa.array(state.kept()[a:b], type=pa.bool_()))
                 .append_column("reason", pa.array(state.reason[a:b].tolist(), type=pa.string()))
                 .append_column("duplicate_of", dup))
        within = np.zeros(state.n, dtype=bool)
        within[a:b] = True
        ids, sums, counts = identity_sums(state, self.config.center_weighting, within)
        own_dups = int(np.sum(state.reason[a:b] == "near_duplicate")) - int(
            np.sum(np.asarray(reason, dtype=object)[pos][a:b] == "near_duplicate"))
        drops = Counter(r for r in state.reason[a:b].tolist() if r is not None)
        extra = {"near_duplicates": own_dups, "group_dedup": dedup, **self._val_overlap(state, a, b, loaded)}
        return UnitResult(table, rows_in=b - a, drops=drops,
                          files={centers_file(unit.id): _centers_bytes([state.names[int(i)] for i in ids],
                                                                       sums, counts)},
                          extra_stats=extra)

    def _val_overlap(self, state, a: int, b: int, loaded) -> dict:
        """Validation overlap of the identities this unit owns (their first kept row is in its shard; the
        unit holds every row of them): {"val": identity -> reason, "val_matched": set -> identities}."""
        valsets = load_valsets(self.config.valsets, loaded.embedder, loaded.dim) if loaded.embedder else []
        if not valsets:
            return {"val": {}, "val_matched": {}}
        thr = resolve_thresholds(self.config, loaded.embedder)
        ids, best_set, hits = overlap_verdicts(state, valsets, thr.val_overlap, thr.val_overlap_image,
                                               self.config.block_size, self.config.center_weighting)
        rows = np.flatnonzero(state.kept())
        first_ids, first = np.unique(state.ident[rows], return_index=True)
        first_row = dict(zip(first_ids.tolist(), rows[first].tolist()))
        own = np.asarray([a <= first_row[int(i)] < b for i in ids], dtype=bool)
        val = {state.names[int(i)]: f"val_overlap:{valsets[int(k)].name}"
               for i, k, o in zip(ids, best_set, own) if o and k >= 0}
        matched = {vs.name: int((hits[:, k] & own).sum()) for k, vs in enumerate(valsets)}
        return {"val": val, "val_matched": matched}

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        names = ctx.inputs["names"]
        before = names.read_json("stats.json")
        embedder, dim = before["embedder"], before["dim"]
        merge_report = ctx.inputs["merge"].read_json("merge.json")["report"]
        # Identity and image count of every identity (no features): min_images and the funnel.
        counted = [t.select(["identity", "count"]) for t in
                   read_center_files(ctx.output, ctx.output.done_ids(), columns=["identity", "count"])]
        counted = [t for t in counted if t.num_rows]
        if counted:
            t = pa.concat_tables(counted)
            uniq, inverse = np.unique(np.asarray(t.column("identity").to_pylist(), dtype=object),
                                      return_inverse=True)
            idents = [str(x) for x in uniq]
            counts = np.bincount(inverse, weights=np.asarray(t.column("count")),
                                 minlength=len(idents)).astype(np.int64)
        else:
            idents, counts = [], np.zeros(0, dtype=np.int64)
        thr = resolve_thresholds(self.config, embedder)
        funnel = list(before["funnel"])
        after_face = funnel[-1]["images"] if funnel else 0
        merged_images = after_face - merge_report["ambiguous_images_dropped"]
        funnel.append({"step": "merge", "identities": len(idents), "images": int(merged_images)})
        funnel.append({"step": "near_duplicates", "identities": len(idents), "images": int(counts.sum())})
        valsets = load_valsets(self.config.valsets, embedder, dim) if embedder else []
        report = {vs.name: {"file": vs.path, "centers": len(vs.centers), "identities": 0, "images": 0,
                            "matched": 0} for vs in valsets}
        drop: dict[str, str] = {}
        for sid in ctx.output.done_ids():
            st = ctx.output.shard_stats(sid)
            drop.update(st.get("val", {}))
            for name, n in st.get("val_matched", {}).items():
                report[name]["matched"] += int(n)
        count_of = dict(zip(idents, counts.tolist()))
        for ident, why in drop.items():
            rep = report[why.split(":", 1)[1]]
            rep["identities"] += 1
            rep["images"] += int(count_of.get(ident, 0))
        alive = np.asarray([i not in drop for i in idents], dtype=bool)
        funnel.append({"step": "val_overlap", "identities": int(alive.sum()), "images": int(counts[alive].sum())})
        small = alive & (counts < self.config.min_images)
        drop.update({idents[int(v)]: "too_few_images" for v in np.flatnonzero(small)})
        alive &= ~small
        funnel.append({"step": "min_images", "identities": int(alive.sum()), "images": int(counts[alive].sum())})
        dups = sum(int(ctx.output.shard_stats(s).get("near_duplicates", 0)) for s in ctx.output.done_ids())
        steps = {**before["steps"], "merge": merge_report, "dedup": {"near_duplicates": dups}, "val_overlap": report,
                 "min_images": {"dropped": int(counts[small].sum())}}
        stats = {"embedder": embedder, "funnel": funnel, "steps": steps,
                 "thresholds": thr.model_dump(mode="json")}
        return FinishResult(files={"final.json": _json_bytes(drop)}, stats=stats)


def _centers_bytes(names: list[str], sums: np.ndarray, counts: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pq.write_table(sums_table(names, sums, counts), buf)
    return buf.getvalue()


class SelectStage(_VerdictStage):
    """Pass "select": the verdicts, with the identity-level drops (validation overlap, too few images)."""

    name = "clean"

    def plan(self, ctx: PlanContext) -> list[WorkUnit]:
        return [WorkUnit(sid) for sid in ctx.inputs["dedup"].done_ids()]

    def run_unit(self, unit: WorkUnit, ctx: UnitContext) -> UnitResult:
        dedup = ctx.inputs["dedup"]
        drop = dedup.read_json("final.json")
        t = dedup.read_shard(unit.id)
        ident = t.column("identity").to_pylist()
        reason = t.column("reason").to_pylist()
        for m, v in enumerate(ident):
            if v is not None and v in drop:
                ident[m], reason[m] = None, drop[v]
        kept = [v is not None for v in ident]
        table = (t.select(["person_id", "sample_id", "detection_index", "source_label", "name"])
                 .append_column("identity", pa.array(ident, type=pa.string()))
                 .append_column("kept", pa.array(kept, type=pa.bool_()))
                 .append_column("reason", pa.array(reason, type=pa.string()))
                 .append_column("duplicate_of", t.column("duplicate_of")))
        drops = Counter(r for r in reason if r is not None)
        return UnitResult(table, rows_in=t.num_rows, drops=drops, extra_stats={"kept": int(sum(kept))})

    def finish(self, ctx: PlanContext, rollup: dict) -> FinishResult:
        before = ctx.inputs["dedup"].read_json("stats.json")
        final = before["funnel"][-1]
        return FinishResult(stats={"identities": final["identities"], "images": final["images"],
                                   "funnel": before["funnel"], "steps": before["steps"],
                                   "embedder": before["embedder"], "thresholds": before["thresholds"]})


def _with_valsets(cfg: CleanConfig) -> str:
    """The config hash plus the contents of the validation center files (a rebuilt file is a new input)."""
    files = {p: (file_sha256(Path(p)) if Path(p).exists() else "missing") for p in cfg.valsets}
    return clean_hash(cfg, valsets=files)


def run_partitioned(cfg: BuildConfig, inputs: dict, output, overwrite: bool = False, executor=None) -> dict:
    """The passes on `executor` (default: the run section's), under `output`/_names, `output`/_merge
    (the search rounds) and `output`/_dedup; returns the roll-up of the selection."""
    from pipeline.registry import executor_from_config

    ex = executor or executor_from_config(cfg)
    out = str(output)
    names_uri, dedup_uri = storage.join(out, "_names"), storage.join(out, "_dedup")
    first = {"faces": str(inputs["faces"])}
    if inputs.get("persons"):
        first["persons"] = str(inputs["persons"])
    ex.run(NamesStage(cfg.clean), first, names_uri, overwrite)
    merge_uri = run_merge(ex, cfg.clean, names_uri, storage.join(out, "_merge"), overwrite)
    ex.run(DedupStage(cfg.clean), {"faces": first["faces"], "names": names_uri, "merge": merge_uri}, dedup_uri,
           overwrite)
    return ex.run(SelectStage(cfg.clean), {"dedup": dedup_uri}, out, overwrite).stats
