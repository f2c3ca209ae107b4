"""Our classes inside the img2dataset job (imported only in the job process and the processes it spawns).

Two img2dataset classes are replaced in `img2dataset.main`'s namespace before the call, in the child only:
- `Resizer` -> `WebBodyResizer` (safe decode + normalisation, see images.py, same geometry and encoding);
- `Downloader` -> `GuardedDownloader`, which installs the guarded urllib opener (pipeline.urlsafety) in each
  download worker process (multiprocessing or Ray) before fetching, so redirects and DNS answers are vetted
  at connect time.
Both are plain subclasses defined in this importable module, so they pickle by reference into the workers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import cv2
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer

from pipeline.download.images import ImageRejected, encode, normalise, resize
from pipeline.urlsafety import install_guarded_opener

ALLOW_ENV = "WEBBODY_ALLOW_PRIVATE_HOSTS"
MAX_BODY_ENV = "WEBBODY_MAX_BODY_BYTES"

# One OpenCV thread per call: img2dataset already runs `thread_count` images at once per process
# (img2dataset's own resizer does the same).
cv2.setNumThreads(1)


class WebBodyResizer(Resizer):
    """img2dataset's Resizer interface (same constructor) with safe decoding and normalisation."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            img_stream.seek(0)
            img = normalise(img_stream.read(), self.max_image_area)
            bgr = resize(
                img.bgr,
                self.image_size,
                self.resize_mode.name,
                self.resize_only_if_bigger,
                self.upscale_interpolation,
                self.downscale_interpolation,
            )
            oh, ow = img.bgr.shape[:2]
            data = encode(bgr, self.encode_format, self.encode_params)
            return data, bgr.shape[1], bgr.shape[0], ow, oh, None
        except ImageRejected as exc:
            return None, None, None, None, None, str(exc)
        except Exception as exc:  # noqa: BLE001  (one bad image never stops a shard)
            return None, None, None, None, None, f"resize_error: {type(exc).__name__}: {exc}"


class GuardedDownloader(Downloader):
    """img2dataset's Downloader that fetches through the SSRF-guarded opener."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Read here, in the job process, and pickled with the instance into every worker (Ray included).
        self.allow_private_hosts = json.loads(os.environ.get(ALLOW_ENV, "[]"))
        self.max_body_bytes = int(os.environ.get(MAX_BODY_ENV, "0")) or None

    def __call__(self, row):
        install_guarded_opener(self.allow_private_hosts, self.max_body_bytes)
        return super().__call__(row)
