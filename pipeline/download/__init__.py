"""Download stage: URL manifest shards -> DOWNLOAD shards, with img2dataset used as a library.

Per job (a group of pending manifest shards, about `download.job_rows` rows):
1. every row's URL is pre-checked (scheme, host, IP literals against the SSRF policy); refused rows get
   their status without a request;
2. the unique remaining URLs (a URL listed for two identities is fetched once) are written, each with a
   key, to `<output>/_img2dataset/input.parquet`;
3. `img2dataset.download` runs on them in a child process (worker.py) with the paper's settings
   (640 px, border resize, white padding, JPEG 85, timeout 20, retries 1), opt-out headers honoured,
   incremental mode, its multiprocessing distributor, or its Ray distributor when a Ray address is set;
4. a retry pass re-runs img2dataset on the URLs that failed for a transient reason (errors.RETRYABLE);
5. results are mapped back to manifest rows by key, and each manifest shard NNNNN is committed as
   download shard NNNNN (atomic, stats, marker), one row per manifest row with `status` "success" or a
   short code (errors.py); then the job's staging folder is removed.

A run killed mid-job resumes it: the staging folder and its plan survive, img2dataset's incremental mode
skips its finished shards, and committed shards are skipped by their markers. `retry_failed_urls()` is a
later retry pass over a finished output (re-fetch the transient failures, re-commit changed shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.config import BuildConfig, DownloadConfig
from pipeline.download.errors import RETRYABLE, status_code
from pipeline.executors import pending_shards, prepare_output
from pipeline.rollup import write_rollup
from pipeline.shards import DatasetDir, atomic_write_json
from pipeline.stage import StageError, config_hash
from pipeline.urlsafety import AllowList, check_url
from schemas.tables import DOWNLOAD, MANIFEST

log = logging.getLogger(__name__)

STAGE = "download"
STAGING = "_img2dataset"
# Settings that change how fast a download runs, not what it produces: they may change between a run and
# its resume without invalidating finished shards.
RUNTIME_ONLY = ("processes_count", "thread_count", "job_rows", "distributor", "retry_failed")
_META_COLS = ["ukey", "status", "error_message", "width", "height", "original_width", "original_height"]


@dataclass
class Fetched:
    """One unique URL's outcome."""

    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    attempts: int = 1


class _StageInfo:
    """What `prepare_output` needs from a stage: a name and a hash of the settings that shape the output."""

    name = STAGE

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg

    def config_hash(self) -> str:
        return config_hash({k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in RUNTIME_ONLY})


def choose_distributor(cfg: DownloadConfig, ray_address: str | None) -> str:
    if cfg.distributor == "ray" or (cfg.distributor == "auto" and ray_address):
        return "ray"
    return "multiprocessing"


def check_config(cfg: DownloadConfig) -> None:
    if cfg.encode_format == "png" and cfg.encode_quality > 9:
        raise StageError("download.encode_quality is the PNG compression level (0-9) when encode_format is png")
    if not cfg.disallowed_header_directives:
        log.warning(
            "download: opt-out headers are NOT honoured (download.disallowed_header_directives is empty); "
            "X-Robots-Tag noai/noindex images will be downloaded"
        )
    if cfg.allow_private_hosts:
        log.warning("download: private/loopback hosts allowed for %s", cfg.allow_private_hosts)


# -- one img2dataset job ------------------------------------------------------------------------------------


def img2dataset_params(cfg: DownloadConfig, url_list: Path, output_folder: Path, n_urls: int,
                       distributor: str) -> dict:
    # About two img2dataset shards per process: enough to balance, few enough that a multiprocessing worker
    # is never respawned (img2dataset's pool recycles a worker after 5 shards, a ~1 s spawn each time).
    per_shard = max(1, min(10_000, math.ceil(n_urls / (2 * cfg.processes_count))))
    return {
        "url_list": str(url_list),
        "output_folder": str(output_folder),
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": ["ukey"],
        "output_format": "parquet",
        "processes_count": cfg.processes_count,
        "thread_count": cfg.thread_count,
        "number_sample_per_shard": per_shard,
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "encode_format": cfg.encode_format,
        "encode_quality": cfg.encode_quality,
        "timeout": cfg.timeout,
        "retries": cfg.retries,
        "disallowed_header_directives": list(cfg.disallowed_header_directives),
        "max_image_area": float(cfg.max_image_area),
        "user_agent_token": cfg.user_agent_token,
        "compute_hash": None,  # we hash the stored image ourselves
        "extract_exif": False,  # orientation is applied by our resizer; raw EXIF is not kept
        "enable_wandb": False,
        "incremental_mode": "incremental",
        "distributor": distributor,
    }


def run_img2dataset(cfg: DownloadConfig, urls: list[tuple[str, str]], workdir: Path, ray_address: str | None,
                    tag: str) -> Path:
    """Fetch `urls` ((ukey, url) pairs) with img2dataset into `workdir/<tag>/`; returns that folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    url_list = workdir / f"{tag}-input.parquet"
    if not url_list.exists():  # on resume the same list is reused (img2dataset shard ids depend on it)
        table = pa.table({"ukey": [k for k, _ in urls], "url": [u for _, u in urls]})
        tmp = url_list.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(url_list)
    n = pq.ParquetFile(url_list).metadata.num_rows
    folder = workdir / tag
    distributor = choose_distributor(cfg, ray_address)
    params = img2dataset_params(cfg, url_list, folder, n, distributor)
    from pipeline.download.child import child_main

    ctx = multiprocessing.get_context("spawn")
    log_path = workdir / f"{tag}.log"
    proc = ctx.Process(
        target=child_main,
        args=(params, list(cfg.allow_private_hosts), str(log_path), ray_address, cfg.max_body_bytes),
        name=f"img2dataset-{tag}",
    )
    t0 = time.perf_counter()
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise StageError(f"img2dataset job failed (exit code {proc.exitcode}); log {log_path}:\n{tail}")
    log.info("download: img2dataset %s: %d URLs in %.1f s (%s)", tag, n, time.perf_counter() - t0, distributor)
    return folder


def fetch_span(folder: Path) -> float:
    """Seconds from the first img2dataset shard's start to the last one's end (download work, no start-up)."""
    spans = []
    for p in folder.glob("*_stats.json"):
        try:
            st = json.loads(p.read_text())
            spans.append((float(st["start_time"]), float(st["end_time"])))
        except (OSError, ValueError, KeyError):
            continue
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def _result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))


def read_outcomes(folder: Path) -> dict[str, Fetched]:
    """Per ukey, what img2dataset reported (image bytes are read later, shard by shard)."""
    files = _result_files(folder)
    out: dict[str, Fetched] = {}
    if not files:
        return out
    table = pads.dataset([str(f) for f in files], format="parquet").to_table(columns=_META_COLS)
    for r in table.to_pylist():
        code = status_code(r["error_message"], r["status"])
        out[r["ukey"]] = Fetched(
            status=code,
            error=None if code == "success" else (r["error_message"] or r["status"]),
            width=r["width"],
            height=r["height"],
            original_width=r["original_width"],
            original_height=r["original_height"],
        )
    return out


def read_images(folders: list[Path], keys: dict[str, int], fmt: str) -> dict[str, bytes]:
    """Image bytes of the successful `keys` (ukey -> pass index that succeeded), from the pass folders."""
    images: dict[str, bytes] = {}
    for i, folder in enumerate(folders):
        wanted = [k for k, p in keys.items() if p == i]
        files = _result_files(folder)
        if not wanted or not files:
            continue
        ds = pads.dataset([str(f) for f in files], format="parquet")
        t = ds.to_table(columns=["ukey", fmt], filter=pc.field("ukey").isin(wanted))
        for k, img in zip(t.column("ukey").to_pylist(), t.column(fmt).to_pylist(), strict=True):
            images[k] = img
    return images


# -- the stage ----------------------------------------------------------------------------------------------


class Job:
    """A group of manifest shards downloaded by one img2dataset call (plus its retry pass)."""

    def __init__(self, cfg: DownloadConfig, manifest: DatasetDir, out: DatasetDir, shard_ids: list[str],
                 ray_address: str | None):
        self.cfg = cfg
        self.manifest = manifest
        self.out = out
        self.shard_ids = shard_ids
        self.ray_address = ray_address
        self.workdir = out.root / STAGING
        self.allow = AllowList(cfg.allow_private_hosts)
        self.fetched: set[str] = set()  # ukeys already handed to a row (a second row reuses the fetch)
        self.fetch_seconds = 0.0

    def run(self) -> None:
        atomic_write_json(self.workdir / "plan.json", {"shards": self.shard_ids})
        tables = {sid: MANIFEST.validate(self.manifest.read_shard(sid), str(self.manifest.parquet(sid)))
                  for sid in self.shard_ids}
        # Pre-check every URL; the rest get a key per unique URL, in manifest order (stable across resumes).
        precheck: dict[str, str] = {}
        ukeys: dict[str, str] = {}
        for t in tables.values():
            for url in t.column("url").to_pylist():
                if url in ukeys or url in precheck:
                    continue
                reason = check_url(url, self.allow, resolve_dns=False)
                if reason:
                    precheck[url] = reason
                else:
                    ukeys[url] = f"u{len(ukeys):09d}"
        by_key = {k: u for u, k in ukeys.items()}
        outcomes: dict[str, Fetched] = {}
        folders: list[Path] = []
        pass_of: dict[str, int] = {}
        if ukeys:
            folders.append(run_img2dataset(self.cfg, [(k, u) for u, k in ukeys.items()], self.workdir,
                                           self.ray_address, "pass1"))
            outcomes = read_outcomes(folders[0])
            self.fetch_seconds += fetch_span(folders[0])
            pass_of = {k: 0 for k, o in outcomes.items() if o.status == "success"}
            retry = [k for k, o in outcomes.items() if o.status in RETRYABLE]
            retry += [k for k in by_key if k not in outcomes]  # lost by img2dataset (a crashed sample)
            if self.cfg.retry_failed and retry:
                log.info("download: retrying %d URLs that failed transiently", len(retry))
                folders.append(run_img2dataset(self.cfg, [(k, by_key[k]) for k in sorted(retry)], self.workdir,
                                               self.ray_address, "pass2"))
                self.fetch_seconds += fetch_span(folders[1])
                for k, o in read_outcomes(folders[1]).items():
                    o.attempts = 2
                    outcomes[k] = o
                    if o.status == "success":
                        pass_of[k] = 1
        for sid, table in tables.items():
            self.commit(sid, table, ukeys, precheck, outcomes, folders, pass_of)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def commit(self, sid: str, table: pa.Table, ukeys: dict[str, str], precheck: dict[str, str],
               outcomes: dict[str, Fetched], folders: list[Path], pass_of: dict[str, int]) -> None:
        t0 = time.perf_counter()
        rows = table.to_pylist()
        need = {ukeys[r["url"]]: pass_of[ukeys[r["url"]]] for r in rows
                if r["url"] in ukeys and ukeys[r["url"]] in pass_of}
        images = read_images(folders, need, self.cfg.encode_format)
        out_rows: list[dict] = []
        drops: Counter = Counter()
        extra: Counter = Counter()
        for r in rows:
            base = {k: r[k] for k in ("sample_id", "label", "name", "url")}
            key = ukeys.get(r["url"])
            if key is None:
                res = Fetched(status=precheck[r["url"]], error="refused before download", attempts=0)
            else:
                res = outcomes.get(key) or Fetched(status="download_error", error="no result from img2dataset")
                if key in self.fetched:
                    extra["url_reused"] += 1  # same URL listed twice in this job: fetched once
                self.fetched.add(key)
                if res.attempts == 2:
                    extra["retried"] += 1
            img = images.get(key) if res.status == "success" and key is not None else None
            if res.status == "success" and img is None:
                res = Fetched(status="download_error", error="image missing from img2dataset output")
            if res.status == "success":
                base.update(status="success", error=None, image=img, width=res.width, height=res.height,
                            original_width=res.original_width, original_height=res.original_height,
                            sha256=hashlib.sha256(img).hexdigest())
                if res.attempts == 2:
                    extra["recovered_by_retry"] += 1
            else:
                drops[res.status] += 1
                base.update(status=res.status, error=(res.error or "")[:500])
            out_rows.append(base)
        out = DOWNLOAD.from_rows(out_rows)
        if out.num_rows > 1:
            out = out.sort_by([("sample_id", "ascending")])
        stats = {
            "stage": STAGE,
            "shard": sid,
            "rows_in": table.num_rows,
            "rows_out": table.num_rows - sum(drops.values()),
            "drops": dict(sorted(drops.items())),
            "seconds": round(time.perf_counter() - t0, 3),
            "notes": dict(sorted(extra.items())),
        }
        self.out.commit_shard(sid, out, stats)


def _jobs(manifest: DatasetDir, todo: list[str], job_rows: int) -> list[list[str]]:
    jobs: list[list[str]] = []
    cur: list[str] = []
    n = 0
    for sid in todo:
        cur.append(sid)
        n += manifest.num_rows(sid)
        if n >= job_rows:
            jobs.append(cur)
            cur, n = [], 0
    if cur:
        jobs.append(cur)
    return jobs


def download(cfg: DownloadConfig, manifest_dir: Path, output: Path, overwrite: bool = False,
             ray_address: str | None = None) -> dict:
    """Download every pending manifest shard of `manifest_dir` into `output`; returns the roll-up stats."""
    check_config(cfg)
    t0 = time.perf_counter()
    manifest, out = DatasetDir(manifest_dir), DatasetDir(output)
    prepare_output(_StageInfo(cfg), out, overwrite)
    todo, _done = pending_shards(manifest, out)
    for sid in [s for s in todo if manifest.num_rows(s) == 0]:
        out.commit_shard(sid, DOWNLOAD.empty(), {"stage": STAGE, "shard": sid, "rows_in": 0, "rows_out": 0,
                                                 "drops": {}, "seconds": 0.0})
    todo = [s for s in todo if not out.is_done(s)]
    staging = out.root / STAGING
    plan = staging / "plan.json"
    jobs: list[list[str]] = []
    if plan.exists():
        planned = json.loads(plan.read_text()).get("shards", [])
        if planned and set(planned) <= set(todo):
            log.info("download: resuming the interrupted job over shards %s", planned)
            jobs.append(planned)
            todo = [s for s in todo if s not in set(planned)]
        else:
            shutil.rmtree(staging, ignore_errors=True)
    elif staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    jobs += _jobs(manifest, todo, cfg.job_rows)
    fetch_seconds = 0.0
    for shard_ids in jobs:
        job = Job(cfg, manifest, out, shard_ids, ray_address)
        job.run()
        fetch_seconds += job.fetch_seconds
    stats = write_rollup(out, STAGE, manifest.done_ids())
    # This invocation's timing (a resumed run reports only its own work): wall clock, and the part of it
    # img2dataset spent downloading (first shard start to last shard end, summed over jobs and passes).
    stats["run"] = {"jobs": len(jobs), "wall_seconds": round(time.perf_counter() - t0, 3),
                    "img2dataset_seconds": round(fetch_seconds, 3)}
    notes: Counter = Counter()
    for sid in manifest.done_ids():
        if out.is_done(sid):
            notes.update(out.shard_stats(sid).get("notes", {}))
    stats["notes"] = dict(sorted(notes.items()))
    if stats["complete"]:
        atomic_write_json(out.root / "stats.json", stats)
    return stats


def run(cfg: BuildConfig, inputs: dict[str, Path], output: Path, overwrite: bool = False) -> dict:
    """Registry entry point: `inputs["query"]` is the manifest directory."""
    if "query" not in inputs:
        raise StageError("download needs the query stage's output (inputs['query'])")
    return download(cfg.download, Path(inputs["query"]), Path(output), overwrite, cfg.run.ray_address)


def retry_failed_urls(cfg: BuildConfig, output: Path, codes: frozenset[str] = RETRYABLE) -> dict:
    """A later retry pass: re-fetch rows of finished download shards whose status is in `codes`.

    Successes replace the failures; shards whose rows changed are re-committed (atomically, new stats).
    Returns {"retried": n, "recovered": m, "shards_rewritten": k}.
    """
    dcfg = cfg.download
    out = DatasetDir(output)
    workdir = out.root / "_retry"
    shutil.rmtree(workdir, ignore_errors=True)
    failing: dict[str, list[str]] = {}
    urls: dict[str, str] = {}
    for sid in out.done_ids():
        t = out.read_shard(sid, columns=["url", "status"])
        mask = pc.is_in(t.column("status"), pa.array(sorted(codes)))
        bad = t.filter(mask).column("url").to_pylist()
        if bad:
            failing[sid] = bad
            for u in bad:
                urls.setdefault(u, f"u{len(urls):09d}")
    if not urls:
        return {"retried": 0, "recovered": 0, "shards_rewritten": 0}
    folder = run_img2dataset(dcfg, [(k, u) for u, k in urls.items()], workdir, cfg.run.ray_address, "retry")
    outcomes = read_outcomes(folder)
    ok = {k: 0 for k, o in outcomes.items() if o.status == "success"}
    images = read_images([folder], ok, dcfg.encode_format)
    recovered = rewritten = 0
    for sid in failing:
        rows = out.read_shard(sid).to_pylist()
        changed = 0
        for r in rows:
            key = urls.get(r["url"])
            if r["status"] not in codes or key is None or key not in outcomes:
                continue
            o = outcomes[key]
            if o.status == "success" and key in images:
                img = images[key]
                r.update(status="success", error=None, image=img, width=o.width, height=o.height,
                         original_width=o.original_width, original_height=o.original_height,
                         sha256=hashlib.sha256(img).hexdigest())
                changed += 1
            elif o.status != r["status"]:
                r.update(status=o.status, error=(o.error or "")[:500])
                changed += 1
        if changed:
            table = DOWNLOAD.from_rows(rows).sort_by([("sample_id", "ascending")])
            st = out.shard_stats(sid)
            drops = Counter(r["status"] for r in rows if r["status"] != "success")
            n_ok = sum(r["status"] == "success" for r in rows)
            recovered += n_ok - st["rows_out"]
            st.update(rows_out=n_ok, drops=dict(sorted(drops.items())))
            st["notes"] = {**st.get("notes", {}), "retry_passes": st.get("notes", {}).get("retry_passes", 0) + 1}
            out.commit_shard(sid, table, st)
            rewritten += 1
    shutil.rmtree(workdir, ignore_errors=True)
    write_rollup(out, STAGE, out.done_ids())
    return {"retried": len(urls), "recovered": recovered, "shards_rewritten": rewritten}
