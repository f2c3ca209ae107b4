"""Identity cleaning: per-name clustering, merging, de-duplication, validation overlap.

`run` is the stage entry point used by `pipeline.registry` (planned passes on the executor,
pipeline/clean/partition.py and cross.py); `run_single_process` is its one-process reference; `build_valset_centers` lives in
`pipeline.valsets`. The steps are small modules: cluster, merge, dedup, overlap, select (their order).
"""

from pipeline.clean.stage import run, run_single_process

__all__ = ["run", "run_single_process"]
