"""One manifest shard in, its DOWNLOAD table and stats out: the download stage's pure unit of work.

`download_shard(rows, cfg, shard_id)` runs in whichever process is given the shard (the driver under the
local executor, a Ray task on any node under the Ray executor) and touches no storage: the stage's
`run_unit` reads the manifest shard and the executor commits the result. Steps:

1. every row's URL is pre-checked (scheme, host, IP literals against the SSRF policy, no DNS); refused
   rows get their status without a request;
2. each unique remaining URL of the shard gets a key (a URL listed twice in the shard is fetched once:
   `notes.url_reused`);
3. img2dataset fetches them: its `Downloader.download_shard` (the per-shard worker its own distributors
   call) with our resizer (`worker.WebBodyResizer`) and an in-memory sample writer, under the guarded
   urllib opener (`pipeline.urlsafety`) installed in this process;
4. a URL whose first attempt failed for a transient reason (`errors.RETRYABLE`) is fetched once more
   (`download.retry_failed`), by a second img2dataset Downloader that starts on the first such failure
   and runs beside the first pass (`_first_pass_and_retries`), not after it;
5. one output row per manifest row, sorted by `sample_id`, with `status` "success" or a short code.

Why img2dataset's `Downloader` and not `img2dataset.download()`: `download()` is a whole job (a reader that
re-shards the input, a logger process, a process pool or its own Ray distributor, a SIGINT handler) and
so a barrier over everything it is given; the stage's unit of work is one manifest shard, scheduled by
the stage, so only img2dataset's per-shard worker is used, the same object its distributors run.
Why an in-memory writer: img2dataset's writers would write an intermediate parquet that we would read
back, re-key and rewrite in our schema; collecting the samples gives the same table with no staging
files, so the only write is the shard's commit to its storage location.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import DownloadConfig
from pipeline.download.errors import RETRYABLE, status_code
from pipeline.urlsafety import AllowList, check_url
from schemas.tables import DOWNLOAD

STAGE = "download"
# Retry batches in flight at once per shard (each an img2dataset Downloader with up to `thread_count` threads).
RETRY_BATCHES = 4


@dataclass
class Fetched:
    """One unique URL's outcome (the image bytes only for a success)."""

    status: str
    error: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    attempts: int = 1


class _Collector:
    """img2dataset's sample-writer interface (constructor, `write`, `close`), keeping samples in memory;
    `on_result(ukey, fetched)` is told of each outcome as img2dataset hands it over."""

    def __init__(self, results: dict[str, Fetched], on_result: Callable[[str, Fetched], None] | None = None):
        self.results = results
        self.on_result = on_result

    def write(self, img_str: bytes | None, key: str, caption: Any, meta: dict) -> None:
        code = status_code(meta.get("error_message"), meta.get("status"))
        res = self.results[meta["ukey"]] = Fetched(
            status=code,
            error=None if code == "success" else (meta.get("error_message") or meta.get("status")),
            image=img_str if code == "success" else None,
            width=meta.get("width"),
            height=meta.get("height"),
            original_width=meta.get("original_width"),
            original_height=meta.get("original_height"),
        )
        if self.on_result is not None:
            self.on_result(meta["ukey"], res)

    def close(self) -> None:
        pass


_opener_lock = threading.Lock()
_opener_for: tuple | None = None


def _install_opener(cfg: DownloadConfig) -> None:
    """The guarded urllib opener, once per process and setting (img2dataset calls urllib.request.urlopen)."""
    global _opener_for
    from pipeline.urlsafety import install_guarded_opener

    key = (tuple(cfg.allow_private_hosts), cfg.max_body_bytes)
    with _opener_lock:
        if _opener_for != key:
            install_guarded_opener(list(cfg.allow_private_hosts), cfg.max_body_bytes)
            _opener_for = key


def fetch_urls(cfg: DownloadConfig, pairs: list[tuple[str, str]],
               on_result: Callable[[str, Fetched], None] | None = None) -> tuple[dict[str, Fetched], float]:
    """Fetch `(ukey, url)` pairs with img2dataset in this process; returns outcomes by ukey and seconds.
    `on_result(ukey, fetched)` is called (in this thread) for each outcome as it comes in."""
    if not pairs:
        return {}, 0.0
    import fsspec

    from pipeline.download.i2d import module
    from pipeline.download.worker import WebBodyResizer

    Downloader = module("downloader").Downloader  # noqa: N806 (img2dataset's class; no torch import: i2d.py)

    _install_opener(cfg)
    fs = fsspec.filesystem("memory")
    # img2dataset's Downloader reads its shard as an Arrow IPC file through fsspec and writes a stats file
    # next to its output; both live in fsspec's in-process memory filesystem, under a unique folder.
    folder = f"/webbody-download/{uuid.uuid4().hex}"
    shard_file = f"memory://{folder}/input.arrow"
    table = pa.table({"ukey": [k for k, _ in pairs], "url": [u for _, u in pairs]})
    with fs.open(f"{folder}/input.arrow", "wb") as fh:
        with pa.ipc.new_file(fh, table.schema) as w:
            w.write_table(table)
    results: dict[str, Fetched] = {}
    resizer = WebBodyResizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        max_image_area=float(cfg.max_image_area),
    )
    directives = list(cfg.disallowed_header_directives) or None
    downloader = Downloader(
        sample_writer_class=lambda *_args: _Collector(results, on_result),
        resizer=resizer,
        thread_count=cfg.thread_count,
        save_caption=False,
        extract_exif=False,  # orientation is applied by our resizer; raw EXIF is not kept
        output_folder=f"memory://{folder}",
        column_list=["ukey", "url"],
        timeout=cfg.timeout,
        number_sample_per_shard=max(10, len(pairs)),
        oom_shard_count=5,
        compute_hash=None,  # we hash the stored image ourselves
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=directives,
    )
    t0 = time.perf_counter()
    try:
        downloader.download_shard((0, shard_file))
    finally:
        try:
            fs.rm(folder, recursive=True)
        except FileNotFoundError:
            pass
    return results, time.perf_counter() - t0


def download_shard(rows: pa.Table, cfg: DownloadConfig, shard_id: str) -> tuple[pa.Table, dict]:
    """A manifest shard's rows -> (its DOWNLOAD table, its stats). Pure: no storage is read or written."""
    t0 = time.perf_counter()
    allow = AllowList(cfg.allow_private_hosts)
    urls = rows.column("url").to_pylist()
    precheck: dict[str, str] = {}
    ukeys: dict[str, str] = {}
    for url in urls:
        if url in ukeys or url in precheck:
            continue
        reason = check_url(url, allow, resolve_dns=False)
        if reason:
            precheck[url] = reason
        else:
            ukeys[url] = f"u{len(ukeys):09d}"  # in manifest order: the same keys on every attempt
    by_key = {k: u for u, k in ukeys.items()}
    notes: Counter = Counter()
    if cfg.retry_failed:
        outcomes, fetch_s, skipped = _first_pass_and_retries(cfg, by_key, retry_deadline(cfg))
        if skipped:
            notes["retry_skipped_time_limit"] = skipped
    else:
        outcomes, fetch_s = fetch_urls(cfg, list(by_key.items()))
    out_rows: list[dict] = []
    drops: Counter = Counter()
    seen: set[str] = set()
    for r in rows.select(["sample_id", "source_label", "name", "url"]).to_pylist():
        key = ukeys.get(r["url"])
        if key is None:
            res = Fetched(status=precheck[r["url"]], error="refused before download", attempts=0)
        else:
            res = outcomes.get(key) or Fetched(status="download_error", error="no result from img2dataset")
            if key in seen:
                notes["url_reused"] += 1  # same URL listed twice in this shard: fetched once
            seen.add(key)
            if res.attempts == 2:
                notes["retried"] += 1
        if res.status == "success" and not res.image:
            res = Fetched(status="download_error", error="image missing from img2dataset output")
        if res.status == "success":
            r.update(status="success", error=None, image=res.image, width=res.width, height=res.height,
                     original_width=res.original_width, original_height=res.original_height,
                     image_sha256=hashlib.sha256(res.image).hexdigest())
            if res.attempts == 2:
                notes["recovered_by_retry"] += 1
        else:
            drops[res.status] += 1
            r.update(status=res.status, error=(res.error or "")[:500])
        out_rows.append(r)
    table = DOWNLOAD.from_rows(out_rows) if out_rows else DOWNLOAD.empty()
    if table.num_rows > 1:
        table = table.sort_by([("sample_id", "ascending")])
    stats = {
        "stage": STAGE,
        "shard": shard_id,
        "rows_in": rows.num_rows,
        "rows_out": rows.num_rows - sum(drops.values()),
        "drops": dict(sorted(drops.items())),
        "seconds": round(time.perf_counter() - t0, 3),
        "fetch_seconds": round(fetch_s, 3),
        "notes": dict(sorted(notes.items())),
    }
    return table, stats


def retry_deadline(cfg: DownloadConfig) -> float:
    """The `time.monotonic()` after which a shard task starts no more retries: the task's time limit
    (`download.task_timeout`, counted from now, the start of the shard's fetching) less one retry's worst
    case (`timeout x (retries + 1)`) and 5 % for the commit. A retry begun later could push the task past
    its limit, where the executor cancels it and runs the whole shard again (and, after its lost-task
    limit, fails the stage): the shard rather commits with those rows' first-attempt status (counted in
    `notes.retry_skipped_time_limit`; `webbody retry-downloads` re-fetches them later)."""
    return time.monotonic() + cfg.task_timeout * 0.95 - cfg.timeout * (cfg.retries + 1)


def _first_pass_and_retries(cfg: DownloadConfig, by_key: dict[str, str],
                            deadline: float = float("inf")) -> tuple[dict[str, Fetched], float, int]:
    """Every URL once, and once more each whose first attempt failed for a transient reason (or gave no
    result), the retries overlapping the first pass; returns the outcomes (a retry's replaces the first,
    `attempts=2`), the seconds img2dataset spent fetching (first pass and retries summed) and how many
    retries were not started because `deadline` (`retry_deadline`) had passed.

    Why not a second pass after the first (as before): a shard's first pass lasts as long as its slowest
    URLs (a stalling host holds a thread for the whole `timeout`, `retries + 1` times), and a retry pass
    begun only then adds its own slowest URLs after it, with most threads idle. Here the failed URLs are
    retried as they come in: whatever failed since the last look goes to its own img2dataset Downloader
    (`min(len(batch), thread_count)` threads, mostly waiting on slow hosts), up to `RETRY_BATCHES` of them
    at once, so a retried stall does not hold up the retries that fail after it, and only the failures of
    the last moments are retried after the first pass ends. Which URLs are retried, and how often, is as
    before: each URL gets at most two attempts, the second only after a RETRYABLE first outcome, so a
    row's status does not depend on timing (only on what the host answers to each attempt)."""
    failed: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    retried: dict[str, Fetched] = {}
    retry_s = [0.0]
    skipped = [0]
    trouble: list[BaseException] = []
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(RETRY_BATCHES)

    def on_first(key: str, res: Fetched) -> None:
        if res.status in RETRYABLE:
            failed.put(key)

    def run_batch(keys: list[str]) -> None:
        try:
            got, seconds = fetch_urls(cfg.model_copy(update={"thread_count": min(len(keys), cfg.thread_count)}),
                                      [(k, by_key[k]) for k in keys])
            with lock:
                retried.update(got)
                retry_s[0] += seconds
        except BaseException as exc:  # noqa: BLE001 (raised in the calling thread below)
            trouble.append(exc)
        finally:
            slots.release()

    def retrier() -> None:
        batches: list[threading.Thread] = []
        finished = False
        while not finished:
            batch = [failed.get()]
            slots.acquire()  # at most RETRY_BATCHES at once: wait here, collecting what fails meanwhile
            while True:
                try:
                    batch.append(failed.get_nowait())
                except queue.Empty:
                    break
            finished = None in batch
            keys = [k for k in batch if k is not None]
            if keys and time.monotonic() > deadline:
                skipped[0] += len(keys)
                keys = []
            if not keys or trouble:
                slots.release()
                continue
            t = threading.Thread(target=run_batch, args=(keys,), name="download-retry", daemon=True)
            t.start()
            batches.append(t)
        for t in batches:
            t.join()

    thread = threading.Thread(target=retrier, name="download-retries", daemon=True)
    thread.start()
    first: dict[str, Fetched] = {}
    try:
        first, first_s = fetch_urls(cfg, list(by_key.items()), on_result=on_first)
        for k in by_key:
            if k not in first:
                failed.put(k)  # img2dataset gave no result for it: retried too
    finally:
        failed.put(None)
        thread.join()
    if trouble:
        raise trouble[0]
    for k, o in retried.items():
        o.attempts = 2
        first[k] = o
    return first, first_s + retry_s[0], skipped[0]


def failed_shard(rows: pa.Table, shard_id: str, code: str, error: str) -> tuple[pa.Table, dict]:
    """Every row of a shard whose task kept failing, under one status (`task_failed`), so it is counted."""
    out_rows = [{**r, "status": code, "error": error[:500]}
                for r in rows.select(["sample_id", "source_label", "name", "url"]).to_pylist()]
    table = DOWNLOAD.from_rows(out_rows) if out_rows else DOWNLOAD.empty()
    if table.num_rows > 1:
        table = table.sort_by([("sample_id", "ascending")])
    stats = {"stage": STAGE, "shard": shard_id, "rows_in": rows.num_rows, "rows_out": 0,
             "drops": {code: rows.num_rows} if rows.num_rows else {}, "seconds": 0.0, "notes": {}}
    return table, stats


def refetch(table: pa.Table, cfg: DownloadConfig, codes: frozenset[str]) -> tuple[pa.Table, int, int]:
    """A later retry pass over one finished DOWNLOAD table: rows whose status is in `codes` are fetched
    again; returns (new table, rows re-fetched, rows whose status or image changed)."""
    rows = table.to_pylist()
    keys: dict[str, str] = {}
    for r in rows:
        if r["status"] in codes:
            keys.setdefault(r["url"], f"u{len(keys):09d}")
    if not keys:
        return table, 0, 0
    outcomes, _ = fetch_urls(cfg, [(k, u) for u, k in keys.items()])
    changed = 0
    for r in rows:
        key = keys.get(r["url"])
        if r["status"] not in codes or key is None or key not in outcomes:
            continue
        o = outcomes[key]
        if o.status == "success" and o.image:
            r.update(status="success", error=None, image=o.image, width=o.width, height=o.height,
                     original_width=o.original_width, original_height=o.original_height,
                     image_sha256=hashlib.sha256(o.image).hexdigest())
            changed += 1
        elif o.status != r["status"]:
            r.update(status=o.status, error=(o.error or "")[:500])
            changed += 1
    out = DOWNLOAD.from_rows(rows).sort_by([("sample_id", "ascending")]) if changed else table
    return out, len(keys), changed
