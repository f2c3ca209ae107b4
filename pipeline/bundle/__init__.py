"""The bundle stage: the clean selection materialised as WebDataset shards, plus verify, report and remove.

`run` is the stage entry point of `pipeline.registry`; `verify.verify_bundle`, `report.write_report` and
`remove.remove_subject` back the `webbody verify|report|remove` commands (flows/dataset_cli.py).
"""

from __future__ import annotations

import os

from pipeline.config import BuildConfig


def run(cfg: BuildConfig, inputs: dict[str, str | os.PathLike], output: str | os.PathLike,
        overwrite: bool = False) -> dict:
    """Write `webbody-{split}-{n:06d}.tar` shards, `index.parquet`, `centers.parquet` and `stats.json` to
    `output`, a local folder or an object-store URI (docs/bundle.md)."""
    from pipeline.bundle.stage import run_bundle

    return run_bundle(cfg, inputs, output, overwrite)
