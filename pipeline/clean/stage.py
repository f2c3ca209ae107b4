"""The clean stage: per-name steps per faces shard, cross-identity steps on identity centers.

`run` is the stage on the executor contract (pipeline/clean/partition.py): planned passes (names,
merge search rounds, dedup, select), run by the run section's executor (local or Ray), which claims, commits,
counts, resumes and rolls up; the passes live under the output (`_names`, `_merge`, `_dedup`), the selection is
the output itself. Each faces row gets a verdict in the clean shard with the same id as the faces shard
it came from, so lineage holds and bundle joins shard by shard.

`run_single_process` is the same computation in one process (every feature in memory); it stays as the
reference the partitioned stage is tested against byte for byte (tests/test_clean_partition.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.clean.load import Loaded, load_faces
from pipeline.clean.overlap import load_valsets
from pipeline.clean.select import clean_selection, identity_strings, resolve_thresholds
from pipeline.config import BuildConfig
from pipeline.rollup import read_stats
from pipeline.shards import DatasetDir, atomic_write_json, file_sha256
from pipeline.stage import StageError, config_hash
from schemas.clean import CLEAN

log = logging.getLogger(__name__)

STAGE = "clean"


def _peek_embedder(inp: DatasetDir) -> str | None:
    for sid in inp.done_ids():
        col = inp.read_shard(sid, columns=["embedder"]).column("embedder")
        if len(col):
            return col[0].as_py()
    return None


def _stage_meta(cfg: BuildConfig, inp: DatasetDir, persons: DatasetDir | None) -> dict:
    embedder = _peek_embedder(inp)
    thresholds = resolve_thresholds(cfg.clean, embedder)
    digest = hashlib.sha256()
    for sid in inp.done_ids():
        digest.update(sid.encode() + inp.marker(sid).read_bytes())
    if persons is not None:
        for sid in persons.done_ids():
            digest.update(b"persons" + sid.encode() + persons.marker(sid).read_bytes())
    for path in cfg.clean.valsets:
        p = Path(path)
        digest.update(p.name.encode() + (file_sha256(p).encode() if p.exists() else b"missing"))
    return {
        "stage": STAGE,
        "config_hash": config_hash({"clean": cfg.clean.model_dump(mode="json"),
                                    "thresholds": thresholds.model_dump(mode="json")}),
        "input_hash": digest.hexdigest()[:16],
    }


def _check_input(inp: DatasetDir) -> None:
    stats = read_stats(inp)
    if stats is None:
        raise StageError(
            f"{inp.uri} has no stats.json: the faces stage has not finished every shard; clean needs all "
            "of them (it is global). Finish the faces stage first (webbody build ... --until faces)"
        )
    done = inp.done_ids()
    if len(done) != stats.get("shards", len(done)):
        raise StageError(f"{inp.uri}: stats.json names {stats.get('shards')} shards but {len(done)} are done")


def _shard_table(loaded: Loaded, k: int, identity: np.ndarray) -> tuple[pa.Table, dict]:
    a, b = int(loaded.offsets[k]), int(loaded.offsets[k + 1])
    meta = loaded.meta.slice(a, b - a)
    reasons = loaded.state.reason[a:b]
    kept = loaded.state.kept()[a:b]
    table = meta.append_column("identity", pa.array(identity[a:b].tolist(), type=pa.string()))
    table = table.append_column("kept", pa.array(kept, type=pa.bool_()))
    table = table.append_column("reason", pa.array(reasons.tolist(), type=pa.string()))
    copy_of = loaded.state.copy_of[a:b]
    pids = loaded.meta.column("person_id")
    dup = [pids[int(c)].as_py() if c >= 0 else None for c in copy_of]
    table = table.append_column("duplicate_of", pa.array(dup, type=pa.string()))
    table = CLEAN.validate(table, where=f"clean shard {loaded.shard_ids[k]}").sort_by("person_id")
    drops = Counter(r for r in reasons.tolist() if r is not None)
    stats = {"stage": STAGE, "shard": loaded.shard_ids[k], "rows_in": b - a, "rows_out": int(kept.sum()),
             "drops": dict(sorted(drops.items())), "seconds": 0.0}
    return table, stats


def _prepare(out: DatasetDir, meta: dict, overwrite: bool) -> bool:
    """True when the directory already holds this exact selection, complete."""
    out.root.mkdir(parents=True, exist_ok=True)
    out.clean_temporaries()
    meta_path = out.root / "_stage.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old == meta:
            return out.complete()
        if not overwrite:
            raise StageError(
                f"{out.root} holds '{old.get('stage')}' output of another config or input ({old}), this run "
                f"is {meta}: use a new output directory, or overwrite=True (--overwrite) to redo it"
            )
        for sid in out.shard_ids():
            out.marker(sid).unlink(missing_ok=True)
        (out.root / "stats.json").unlink(missing_ok=True)
    atomic_write_json(meta_path, meta)
    return False


def run_single_process(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """The whole selection in one process (the reference of `run`)."""
    inp, out = DatasetDir(inputs["faces"]), DatasetDir(output)
    # The persons crops give the perceptual hashes that find copies of one photo (pipeline/clean/copies.py).
    persons = DatasetDir(inputs["persons"]) if inputs.get("persons") else None
    if persons is None:
        log.warning("clean: no persons input, so copies of one photo (mirrored, cropped) are not collapsed")
    _check_input(inp)
    meta = _stage_meta(cfg, inp, persons)
    if _prepare(out, meta, overwrite):
        log.info("clean: %s already holds this selection; skipped", out.root)
        return read_stats(out.root)

    t0 = time.perf_counter()
    loaded = load_faces(inp, persons)
    thresholds = resolve_thresholds(cfg.clean, loaded.embedder)
    valsets = load_valsets(cfg.clean.valsets, loaded.embedder, loaded.dim) if loaded.embedder else []
    result = clean_selection(loaded.state, cfg.clean, thresholds, valsets)
    identity = identity_strings(loaded.state)

    rows_in = rows_out = 0
    drops: Counter = Counter()
    for k, sid in enumerate(loaded.shard_ids):
        table, stats = _shard_table(loaded, k, identity)
        rows_in, rows_out = rows_in + stats["rows_in"], rows_out + stats["rows_out"]
        drops.update(stats["drops"])
        if not out.is_done(sid):
            out.commit_shard(sid, table, stats)
    final = result["funnel"][-1]
    rollup = {
        "stage": STAGE,
        "shards": len(loaded.shard_ids),
        "shards_done": len(loaded.shard_ids),
        "complete": True,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "drops": dict(sorted(drops.items())),
        "seconds": round(time.perf_counter() - t0, 3),
        "identities": final["identities"],
        "images": final["images"],
        "funnel": result["funnel"],
        "steps": result["steps"],
        "embedder": loaded.embedder,
        "thresholds": thresholds.model_dump(mode="json"),
    }
    atomic_write_json(out.root / "stats.json", rollup)
    return rollup


def run(cfg: BuildConfig, inputs: dict, output, overwrite: bool = False, executor=None) -> dict:
    """The clean stage on the executor (see the module doc); returns the selection's roll-up."""
    from pipeline.clean.partition import run_partitioned

    inp = DatasetDir(inputs["faces"])
    if not inputs.get("persons"):
        log.warning("clean: no persons input, so copies of one photo (mirrored, cropped) are not collapsed")
    _check_input(inp)
    # Refuse missing or mismatched validation center files before any pass runs.
    for sid in inp.done_ids():
        head = inp.read_shard(sid, columns=["embedder", "feature_dim"])
        if head.num_rows:
            load_valsets(cfg.clean.valsets, head.column("embedder")[0].as_py(),
                         int(head.column("feature_dim")[0].as_py()))
            break
    return run_partitioned(cfg, inputs, output, overwrite, executor)
