"""Our resizer for img2dataset's per-shard Downloader (imported only in processes that run download tasks).

`WebBodyResizer` keeps img2dataset's `Resizer` interface (same constructor, same call and return values)
with safe decoding and repair (images.py), same geometry and encoding.
"""

from __future__ import annotations

import cv2

from pipeline.download.i2d import module
from pipeline.download.images import ImageRejected, encode, repair_image, resize

Resizer = module("resizer").Resizer  # img2dataset's, imported without its torch-importing package __init__

# One OpenCV thread per call: img2dataset already runs `thread_count` images at once per process
# (img2dataset's own resizer does the same).
cv2.setNumThreads(1)


class WebBodyResizer(Resizer):
    """img2dataset's Resizer interface (same constructor) with safe decoding and repair."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            img_stream.seek(0)
            img = repair_image(img_stream.read(), self.max_image_area)
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
