"""Fault-injection helpers: toy stages, a killable build runner, and byte-level comparison of build trees.

Used by tests/test_ops_*.py. Two kinds of faults:
- a whole build process killed with SIGKILL (its process group, as a crashed machine would lose it) at a
  chosen instant, then re-run to completion;
- a Ray node removed without grace in the middle of a model stage (`ray.cluster_utils.Cluster`).
After either, the finished output must equal an undisturbed build file for file, byte for byte, except
for wall-clock timings inside stats JSON (`seconds`), which are normalised away and reported as such.

Also runnable as a script: `python -m tests.faults chain IN OUT [--executor local|ray] [--delay S]` runs a
three-stage toy chain (a model stage on an actor pool, then CPU stages) over IN, for kill tests of the
executors alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.shards import DatasetDir, file_sha256, format_shard_id
from pipeline.stage import BatchResult, ShardStage
from schemas.base import TableSchema

REPO = Path(__file__).resolve().parent.parent

# -- toy stages ------------------------------------------------------------------------------------------


def toy_schema(name: str, column: str = "x", type_: pa.DataType | None = None) -> TableSchema:
    """A toy stage table (version 1): a non-null `sample_id` and one value `column` (int64 unless `type_`)."""
    value = pa.field(column, type_ if type_ is not None else pa.int64())
    return TableSchema(name, 1, pa.schema([pa.field("sample_id", pa.string(), False), value]))


TOY_IN = toy_schema("toy_in")
TOY_OUT = toy_schema("toy_out")


class SlowSquare(ShardStage):
    """A 'model' stage: sleeps `delay` seconds per batch (the model's cost), squares even x, drops odd x."""

    name = "slow_square"
    input_schema = TOY_IN
    output_schema = TOY_OUT
    uses_model = True

    def __init__(self, delay: float = 0.05, batch_size: int = 4, probe_dir: str | None = None):
        # probe_dir: where each worker records the Ray node it runs on (a test then kills that node).
        super().__init__({"delay": delay, "batch_size": batch_size, "probe_dir": probe_dir})

    def setup(self) -> None:
        probe = self.config.get("probe_dir")
        if probe:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
            Path(probe).mkdir(parents=True, exist_ok=True)
            (Path(probe) / f"{node}.{os.getpid()}").write_text(node)

    @property
    def batch_size(self) -> int:
        return int(self.config["batch_size"])

    def process(self, batch: pa.Table) -> BatchResult:
        time.sleep(float(self.config["delay"]))
        rows, drops = [], Counter()
        for r in batch.to_pylist():
            if r["x"] % 2:
                drops["odd"] += 1
            else:
                rows.append({"sample_id": r["sample_id"], "x": r["x"] * r["x"]})
        return BatchResult(TOY_OUT.from_rows(rows), drops)


class AddOffset(ShardStage):
    """A CPU stage reading `toy_out`: adds `offset`, drops multiples of `drop_mod` as `filtered`."""

    name = "add_offset"
    input_schema = TOY_OUT
    output_schema = TOY_OUT
    uses_model = False

    def __init__(self, offset: int = 1, drop_mod: int = 3, delay: float = 0.0):
        super().__init__({"offset": offset, "drop_mod": drop_mod, "delay": delay})

    def process(self, batch: pa.Table) -> BatchResult:
        time.sleep(float(self.config["delay"]))
        rows, drops = [], Counter()
        for r in batch.to_pylist():
            if r["x"] % int(self.config["drop_mod"]) == 0:
                drops["filtered"] += 1
            else:
                rows.append({"sample_id": r["sample_id"], "x": r["x"] + int(self.config["offset"])})
        return BatchResult(TOY_OUT.from_rows(rows), drops)


def make_toy_input(root: Path, n_shards: int = 4, rows: int = 24) -> DatasetDir:
    """A finished input dataset directory of `n_shards` shards of `rows` rows each."""
    d = DatasetDir(root)
    for s in range(n_shards):
        sid = format_shard_id(s)
        t = TOY_IN.from_rows([{"sample_id": f"{sid}-{i:04d}", "x": s * rows + i} for i in range(rows)])
        d.commit_shard(sid, t, {"rows_in": rows, "rows_out": rows, "drops": {}})
    return d


def run_toy_chain(inp: Path, out: Path, executor: str = "local", delay: float = 0.05,
                  address: str | None = None, probe_dir: str | None = None) -> None:
    """square (model stage) -> offset1 (CPU) -> offset2 (CPU), each resumable from its markers."""
    from pipeline.executors import LocalExecutor, RayExecutor

    ex = LocalExecutor() if executor == "local" else RayExecutor(num_actors=1, actor_cpus=0.5, address=address)
    ex.run(SlowSquare(delay=delay, probe_dir=probe_dir), inp, out / "square")
    ex.run(AddOffset(offset=1, delay=delay / 4), out / "square", out / "offset1")
    ex.run(AddOffset(offset=7, drop_mod=5, delay=delay / 4), out / "offset1", out / "offset2")
    (out / "BUILD_DONE").write_text("ok\n")


# -- comparing build trees ---------------------------------------------------------------------------------

# Wall-clock timings ("seconds", "*_seconds") and a stage roll-up's "run" block (facts about the latest
# invocation: its timing and how many download jobs it started) legitimately differ between a resumed and
# an undisturbed build; everything else in a JSON file must be equal.
VOLATILE_JSON_KEYS = frozenset({"seconds", "run"})


def _volatile(key: str, keys: frozenset[str]) -> bool:
    return key in keys or key.endswith("_seconds")


def _strip_keys(node, keys: frozenset[str]):
    if isinstance(node, dict):
        return {k: _strip_keys(v, keys) for k, v in node.items() if not _volatile(k, keys)}
    if isinstance(node, list):
        return [_strip_keys(v, keys) for v in node]
    return node


def file_digest(path: Path, volatile_keys: frozenset[str] = VOLATILE_JSON_KEYS) -> str:
    """sha256 of a file; for JSON files, of its content with wall-clock keys removed."""
    if path.suffix == ".json" and volatile_keys:
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError):
            return file_sha256(path)
        blob = json.dumps(_strip_keys(data, volatile_keys), sort_keys=True).encode()
        return "json:" + hashlib.sha256(blob).hexdigest()
    return file_sha256(path)


def tree_digests(root: Path, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Relative path -> digest of every file under `root` (hidden files included: nothing may hide).

    `exclude` entries match a relative path, a folder prefix, or a file name anywhere in the tree.
    """
    skip = tuple(exclude)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(rel == s or p.name == s or rel.startswith(s.rstrip("/") + "/") for s in skip):
            out[rel] = file_digest(p)
    return out


def diff_trees(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """Human-readable differences: files missing, extra, or with other bytes."""
    problems = [f"missing: {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"extra: {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"differs: {k}" for k in sorted(expected.keys() & got.keys()) if expected[k] != got[k]]
    return problems


def visible_problems(root: Path) -> list[str]:
    """What a reader could trip over: a marker whose parquet is missing or has other bytes than recorded.

    Half-written temporaries are hidden (`.name.tmp`) and never read; a shard without a marker is ignored by
    readers and redone by the next run; so the only visible corruption is a marker that lies.
    """
    problems = []
    for marker in sorted(root.rglob("part-*.done")):
        parquet = marker.with_name(marker.name[: -len(".done")] + ".parquet")
        try:
            info = json.loads(marker.read_text())
        except ValueError:
            problems.append(f"unreadable marker {marker}")
            continue
        if not parquet.exists():
            problems.append(f"marker without shard: {marker}")
        elif info.get("sha256") and file_sha256(parquet) != info["sha256"]:
            problems.append(f"shard bytes differ from its marker: {parquet}")
    return problems


def leftover_temporaries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*.tmp"))


# -- killing builds ------------------------------------------------------------------------------------------


@dataclass
class KillRecord:
    delay_s: float
    killed: bool  # False when the run finished before the kill instant
    returncode: int | None
    progress: list[str] = field(default_factory=list)  # stage dirs with markers at the kill


def run_or_kill(cmd: Sequence[str], kill_after: float | None, timeout_s: float, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> bool:
    """Run `cmd` in its own process group to the end (True; it must exit 0), or SIGKILL the whole group after
    `kill_after` seconds (False). Without `kill_after` it may run `timeout_s`."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=kill_after if kill_after is not None else timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return False
    assert proc.returncode == 0, out.decode()[-4000:]
    return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started in its session (Ray's raylet, workers, servers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def _launched(cmd: Sequence[str], env: dict[str, str] | None, cwd: Path | None,
              log_path: Path | None) -> Iterator[subprocess.Popen]:
    """`cmd` started in its own session (so `kill_group` reaches all it starts), its output appended to
    `log_path` (or dropped); the log is closed when the block ends."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        yield subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    finally:
        if log_path:
            log.close()


def run_killed_at(cmd: Sequence[str], delay_s: float, env: dict[str, str] | None = None,
                  cwd: Path | None = None, log_path: Path | None = None) -> KillRecord:
    """Start `cmd` in its own session, SIGKILL its whole group after `delay_s` (if still running)."""
    with _launched(cmd, env, cwd, log_path) as proc:
        try:
            rc = proc.wait(timeout=delay_s)
            return KillRecord(delay_s, False, rc)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return KillRecord(delay_s, True, proc.returncode)


def run_to_end(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout_s: float = 600, log_path: Path | None = None) -> int:
    with _launched(cmd, env, cwd, log_path) as proc:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise


# -- kills chosen by progress ----------------------------------------------------------------------------------

STAGES = ("query", "download", "persons", "faces", "clean", "bundle")
POLL_S = 0.01


def _entries(stage_dir: Path) -> set[str]:
    try:
        return {p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*")}
    except (FileNotFoundError, OSError):  # a temporary vanished mid-listing: list again next poll
        return set()


def stage_in_progress(out: Path, stages: Sequence[str] = STAGES) -> str:
    """The stage a build is working on: the first without its roll-up `stats.json` ("finish" after all)."""
    return next((s for s in stages if not (out / s / "stats.json").exists()), "finish")


def _watch(cmd: Sequence[str], env: dict[str, str] | None, cwd: Path | None, log_path: Path | None,
           timeout_s: float) -> Iterator[tuple[subprocess.Popen, float]]:
    """Start `cmd` (as `_launched`) and yield `(proc, seconds since the start)` every POLL_S, each after a
    `proc.poll()`; the last one is the poll that saw it exit (`proc.returncode` set). Past `timeout_s` it
    kills the group and raises TimeoutError. Callers wrap it in `closing`, so one that stops early (a kill)
    closes the log at once."""
    t0 = time.monotonic()
    with _launched(cmd, env, cwd, log_path) as proc:
        while True:
            rc = proc.poll()
            now = time.monotonic() - t0
            yield proc, now
            if rc is not None:
                return
            if now > timeout_s:
                kill_group(proc)
                raise TimeoutError(f"{list(cmd)} ran over {timeout_s} s")
            time.sleep(POLL_S)


def stage_timeline(cmd: Sequence[str], out: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                   log_path: Path | None = None, timeout_s: float = 900,
                   stages: Sequence[str] = STAGES) -> tuple[int, dict[str, dict[str, float]]]:
    """Run `cmd` to the end, watching `out`: when each stage's folder first gets an entry (its claim file, a
    temporary, a marker) and when its `stats.json` appears, in seconds from the start."""
    seen: dict[str, dict[str, float]] = {s: {} for s in stages}
    with closing(_watch(cmd, env, cwd, log_path, timeout_s)) as polls:
        for proc, now in polls:
            for s in stages:
                d = out / s
                if "first_s" not in seen[s] and d.exists() and _entries(d):
                    seen[s]["first_s"] = round(now, 3)
                if "done_s" not in seen[s] and (d / "stats.json").exists():
                    seen[s]["done_s"] = round(now, 3)
            if proc.returncode is not None:
                break
    return proc.returncode, seen


def run_killed_in_stage(cmd: Sequence[str], out: Path, stage: str, offset_s: float,
                        env: dict[str, str] | None = None, cwd: Path | None = None,
                        log_path: Path | None = None, timeout_s: float = 900) -> dict:
    """Start `cmd`; once `stage`'s folder gets a NEW entry (a temporary, a marker or its claim file: this run
    has started writing it), wait `offset_s` more, then SIGKILL the whole process group.

    Returns what happened: `killed` (False when the run ended first), `trigger_s` (when the stage started
    writing, None if it never did in this run), `landed_in` (the stage in progress at the kill)."""
    d = out / stage
    before = _entries(d) if d.exists() else set()
    trigger: float | None = None
    with closing(_watch(cmd, env, cwd, log_path, timeout_s)) as polls:
        for proc, now in polls:
            if proc.returncode is not None:
                break
            if trigger is None and d.exists() and (_entries(d) - before):
                trigger = round(now, 3)
            if trigger is not None and now >= trigger + offset_s:
                kill_group(proc)
                # Read after the kill: the tree is frozen, so the first unfinished stage is where it landed.
                landed = stage_in_progress(out)
                return {"stage": stage, "offset_s": round(offset_s, 3), "killed": True, "rc": proc.returncode,
                        "trigger_s": trigger, "kill_s": round(now, 3), "landed_in": landed}
    return {"stage": stage, "offset_s": round(offset_s, 3), "killed": False, "rc": proc.returncode,
            "trigger_s": trigger, "landed_in": None}


def stage_windows(timeline: dict[str, dict[str, float]]) -> dict[str, float]:
    """How long each stage wrote (first entry -> stats.json) in an undisturbed build: the range kill
    offsets are drawn from."""
    out = {}
    for s, t in timeline.items():
        if "first_s" in t and "done_s" in t:
            out[s] = max(t["done_s"] - t["first_s"], POLL_S)
    return out


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current (offline-safe) environment, with the repo importable and progress bars off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("WEBBODY_PROGRESS", "off")
    env.update(extra or {})
    return env


def _main(argv: list[str] | None = None) -> int:
    from pipeline.runtime import ensure_offline_env

    ensure_offline_env()
    ap = argparse.ArgumentParser(prog="python -m tests.faults")
    sub = ap.add_subparsers(dest="cmd", required=True)
    chain = sub.add_parser("chain", help="run the toy three-stage chain")
    chain.add_argument("input", type=Path)
    chain.add_argument("output", type=Path)
    chain.add_argument("--executor", choices=["local", "ray"], default="local")
    chain.add_argument("--delay", type=float, default=0.05)
    args = ap.parse_args(argv)
    run_toy_chain(args.input, args.output, args.executor, args.delay)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
