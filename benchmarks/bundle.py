"""Bundle throughput: writing shards vs a plain sequential write of the same bytes (same disk, same run), the
whole stage (decode + resize + JPEG encode + write), and reading the shards through each reader.

    .venv/bin/python benchmarks/bundle.py [--ids 100 --per-id 20] [--workdir DIR]

Prints a table and writes benchmarks/results/bundle.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.runtime import ensure_offline_env  # noqa: E402

ensure_offline_env()


def _members(out: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    from pipeline.bundle.tarpack import iter_members, split_member_name

    samples: dict[str, list[tuple[str, bytes]]] = {}
    for tar in sorted(out.glob("webbody-*.tar")):
        for ti, data in iter_members(tar):
            key, ext = split_member_name(ti.name)
            samples.setdefault(key, []).append((ext, data))
    return list(samples.items())


def bench_write(samples, workdir: Path, per_shard: int, repeats: int = 3) -> dict:
    """Tar shards (our writer, fsync per shard) vs the same payload bytes written plainly (fsync per file)."""
    from pipeline.bundle.tarpack import write_shard_atomic

    payload = sum(len(d) for _, ms in samples for _, d in ms)
    # The stage hashes members while rendering (parallel work); the writer gets (ext, data, sha256) triples.
    hashed = [(k, [(e, d, hashlib.sha256(d).hexdigest()) for e, d in ms]) for k, ms in samples]
    chunks = [hashed[i: i + per_shard] for i in range(0, len(hashed), per_shard)]
    best_tar = best_plain = float("inf")
    tar_bytes = 0
    for _ in range(repeats):
        d = workdir / "w"
        d.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for n, chunk in enumerate(chunks):
            write_shard_atomic(d / f"s-{n:06d}.tar", lambda w, c=chunk: [w.add(k, ms) for k, ms in c])
        best_tar = min(best_tar, time.perf_counter() - t0)
        tar_bytes = sum(p.stat().st_size for p in d.glob("*.tar"))
        for p in d.iterdir():
            p.unlink()
        t0 = time.perf_counter()
        for n, chunk in enumerate(chunks):
            with open(d / f"p-{n:06d}.bin", "wb", buffering=1 << 20) as fh:
                for _, ms in chunk:
                    for _, data, _ in ms:
                        fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        best_plain = min(best_plain, time.perf_counter() - t0)
        for p in d.iterdir():
            p.unlink()
    return {
        "samples": len(samples), "payload_mb": round(payload / 1e6, 2), "tar_mb": round(tar_bytes / 1e6, 2),
        "tar_write_mb_s": round(payload / 1e6 / best_tar, 1), "plain_write_mb_s": round(payload / 1e6 / best_plain, 1),
        "tar_write_samples_s": round(len(samples) / best_tar, 0),
        "ratio_vs_plain": round(best_plain / best_tar, 3),
    }


def bench_read(out: Path, workdir: Path) -> dict:
    files = sorted(str(p) for p in out.glob("webbody-*.tar"))
    total = sum(Path(f).stat().st_size for f in files)
    res = {}

    import webdataset as wds

    t0 = time.perf_counter()
    n = sum(1 for _ in wds.WebDataset(files, shardshuffle=False, empty_check=False))
    dt = time.perf_counter() - t0
    res["webdataset"] = {"samples": n, "samples_s": round(n / dt), "mb_s": round(total / 1e6 / dt, 1)}

    import pyarrow.parquet as pq

    from pipeline.bundle.tarpack import read_at

    rows = pq.read_table(out / "index.parquet", columns=["shard", "jpg_offset", "jpg_size"]).to_pylist()
    t0 = time.perf_counter()
    got = sum(len(read_at(out / r["shard"], r["jpg_offset"], r["jpg_size"])) for r in rows)
    dt = time.perf_counter() - t0
    res["index_random_access_jpg"] = {"samples": len(rows), "samples_s": round(len(rows) / dt),
                                      "mb_s": round(got / 1e6 / dt, 1)}

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.read_webdataset(files, decoder=None)
        ds.materialize()  # warm: worker start-up is not read throughput
        t0 = time.perf_counter()
        n = sum(b["__key__"].shape[0] for b in ray.data.read_webdataset(files, decoder=None).iter_batches(
            batch_format="numpy", batch_size=256))
        dt = time.perf_counter() - t0
        res["ray_read_webdataset"] = {"samples": n, "samples_s": round(n / dt), "mb_s": round(total / 1e6 / dt, 1)}
    finally:
        ray.shutdown()

    from datasets import load_dataset

    t0 = time.perf_counter()
    hf = load_dataset("webdataset", data_files={"train": files}, split="train", cache_dir=str(workdir / "hf"))
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for row in hf:
        row["jpg"].load()
        n += 1
    dt = time.perf_counter() - t0
    res["hf_datasets"] = {"samples": n, "prepare_s": round(prep, 2), "iter_samples_s_decoded": round(n / dt),
                          "mb_s_incl_prepare": round(total / 1e6 / (prep + dt), 1)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ids", type=int, default=100)
    ap.add_argument("--per-id", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--workdir", help="scratch directory (default: a temporary one on the repo's disk)")
    args = ap.parse_args()

    from pipeline.bundle import run
    from tests.bundle_support import make_build, small_config

    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-bundle-", dir=REPO / ".cache"))
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = make_build(base, n_ids=args.ids, per_id=args.per_id, n_shards=8, dropped=0)
    gen_s = time.perf_counter() - t0
    cfg = small_config(samples_per_shard=args.per_shard, test_identities=max(1, args.ids // 10))
    t0 = time.perf_counter()
    stats = run(cfg, inputs, base / "bundle")
    stage_s = time.perf_counter() - t0
    samples = _members(base / "bundle")
    result = {
        "machine": f"{os.cpu_count()} CPUs",
        "stage": {"samples": stats["rows_out"], "seconds": round(stage_s, 2),
                  "samples_s": round(stats["rows_out"] / stage_s, 1), "mb_written": round(stats["bytes"] / 1e6, 2),
                  "note": "local executor, one process: decode crop + resize + JPEG q95 + tar + index"},
        "write": bench_write(samples, base, args.per_shard),
        "read": bench_read(base / "bundle", base),
        "input_generation_s": round(gen_s, 1),
    }
    out = REPO / "benchmarks" / "results" / "bundle.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    w = result["write"]
    buf = io.StringIO()
    buf.write("| measure | value |\n|---|---|\n")
    buf.write(f"| bundle stage (render + write), samples/s | {result['stage']['samples_s']} |\n")
    buf.write(f"| tar shard write, MB/s | {w['tar_write_mb_s']} ({w['tar_write_samples_s']:.0f} samples/s) |\n")
    buf.write(f"| plain sequential write of the same bytes, MB/s | {w['plain_write_mb_s']} |\n")
    buf.write(f"| tar write / plain write | {w['ratio_vs_plain']:.0%} |\n")
    for name, r in result["read"].items():
        buf.write(f"| read: {name} | {json.dumps(r)} |\n")
    print(buf.getvalue())
    print(f"wrote {out}")
    import shutil

    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
