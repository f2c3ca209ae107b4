"""Progress bars for long work: tqdm on a terminal, quiet (but still counting) in CI and logs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable | None = None, **kwargs: Any):
    from tqdm.auto import tqdm

    disable = os.environ.get("WEBBODY_PROGRESS", "auto") == "off" or (
        os.environ.get("WEBBODY_PROGRESS", "auto") == "auto" and not sys.stderr.isatty()
    )
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
