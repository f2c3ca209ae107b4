"""Image repair for downloads: decode safely, fix what img2dataset's OpenCV path gets wrong, resize.

img2dataset decodes with `cv2.imdecode(IMREAD_UNCHANGED)`, which ignores EXIF orientation, keeps 16-bit
samples (then fails to encode JPEG), decodes a truncated JPEG into a half-grey picture without complaint,
and allocates a decompression bomb in full before checking its area. `repair_image()` instead:

1. reads only the header to refuse images larger than `max_area` pixels before decoding (`image_too_large`);
2. decodes fully with Pillow, refusing truncated files (`truncated`) and non-images (`not_an_image`);
3. takes the first frame of an animation, applies EXIF orientation, scales 16-bit samples to 8 bits,
   converts CMYK, palette and grey to RGB, and composites transparency onto white.

Fast path: a plain 8-bit RGB or grey JPEG with no rotation that ends with its end-of-image marker (most
of the web) is decoded by OpenCV straight to BGR, as img2dataset does; everything else goes through
Pillow. Arrays are BGR throughout, OpenCV's order, so nothing is copied just to swap channels.

`resize()` then applies img2dataset's own geometry (same target sizes, interpolation and centred white
padding as its `border` mode) with OpenCV, so output matches the paper's download step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own area limit before decoding; Pillow's global limit would raise or warn with its own
# wording and threshold instead.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(ValueError):
    """A downloaded body that is not a usable image; `code` is the stats reason."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


@dataclass
class RepairedImage:
    bgr: np.ndarray  # HxWx3 uint8, upright, BGR (OpenCV's channel order)
    notes: tuple[str, ...]  # what was fixed: exif_rotated, animated, cmyk, high_bit_depth, alpha

    @property
    def rgb(self) -> np.ndarray:
        return self.bgr[:, :, ::-1]


def repair_image(data: bytes, max_area: float) -> RepairedImage:
    if not data:
        raise ImageRejected("empty_body", "0 bytes")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image", f"{len(data)} bytes, starts {data[:16]!r}") from exc
    except Exception as exc:  # noqa: BLE001  (Pillow raises many types for broken headers)
        # Plugins registered by other libraries (imported elsewhere in the process) may raise their own
        # error types on non-image bytes instead of UnidentifiedImageError: sniff the signature to decide.
        if not _has_image_signature(data):
            raise ImageRejected("not_an_image", f"{len(data)} bytes, starts {data[:16]!r}") from exc
        raise _decode_failure(exc) from exc
    if not _has_image_signature(data) and im.format not in _ACCEPTED_FORMATS:
        # identified by some exotic plugin (e.g. text-based formats), but not a web image
        raise ImageRejected("not_an_image", f"{len(data)} bytes read as {im.format}, starts {data[:16]!r}")
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageRejected("decode_error", f"size {w}x{h}")
    if w * h > max_area:
        raise ImageRejected("image_too_large", f"{w}x{h} > {int(max_area)} pixels")
    notes: list[str] = []
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block is ignored, as browsers do)
        orientation = 1
    if (im.format == "JPEG" and im.mode in ("RGB", "L") and orientation in (1, None)
            and data.rstrip(b"\0").endswith(b"\xff\xd9")):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is not None:
            return RepairedImage(bgr, ())
    if getattr(im, "is_animated", False):
        notes.append("animated")  # keep the first frame (Pillow opens on frame 0)
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001
        raise _decode_failure(exc) from exc
    try:
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
            notes.append("exif_rotated")
        bgr = cv2.cvtColor(_to_rgb(im, notes), cv2.COLOR_RGB2BGR)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("decode_error", str(exc)) from exc
    return RepairedImage(bgr, tuple(notes))


_ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "AVIF", "HEIF"}
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\0", b"MM\0*", b"\0\0\1\0")


def _has_image_signature(data: bytes) -> bool:
    head = data[:16]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    return head.startswith(_SIGNATURES) or head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1")


def _decode_failure(exc: Exception) -> ImageRejected:
    # Pillow says "image file is truncated" or "Truncated File Read" depending on where the data ran out
    code = "truncated" if "truncat" in str(exc).lower() else "decode_error"
    return ImageRejected(code, f"{type(exc).__name__}: {exc}")


def _to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits (Pillow's convert("L") clips at 255 instead of scaling)
        arr = np.asarray(im).astype(np.uint32)
        peak = 65535 if mode.startswith("I;16") or arr.max() > 255 else 255
        grey = (arr * 255 // max(peak, 1)).astype(np.uint8)
        notes.append("high_bit_depth")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im)
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        notes.append("high_bit_depth")
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "CMYK":
        notes.append("cmyk")
        return np.asarray(im.convert("RGB"))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        notes.append("alpha")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        return np.asarray(im.convert("RGB"))
    return np.asarray(im)


def resize(rgb: np.ndarray, size: int, mode: str, only_if_bigger: bool, up: int, down: int) -> np.ndarray:
    """img2dataset's resize geometry on an image array (border = longest side to `size`, white padding)."""
    h, w = rgb.shape[:2]
    if mode == "no":
        return rgb
    if mode in ("keep_ratio", "center_crop"):
        downscale = min(w, h) > size
        if only_if_bigger and not downscale:
            return rgb
        out = _scale(rgb, size / min(h, w), down if downscale else up)
        if mode == "center_crop":
            oh, ow = out.shape[:2]
            top, left = (oh - size) // 2, (ow - size) // 2
            out = out[max(top, 0) : max(top, 0) + size, max(left, 0) : max(left, 0) + size]
        return out
    # border
    downscale = max(w, h) > size
    if only_if_bigger and not downscale:
        return rgb
    out = _scale(rgb, size / max(h, w), down if downscale else up)
    oh, ow = out.shape[:2]
    top, left = max(size - oh, 0) // 2, max(size - ow, 0) // 2
    bottom, right = max(size - oh, 0) - top, max(size - ow, 0) - left
    if top or bottom or left or right:
        out = cv2.copyMakeBorder(out, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return out


def _scale(rgb: np.ndarray, scale: float, interpolation: int) -> np.ndarray:
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return cv2.resize(rgb, (nw, nh), interpolation=interpolation)


def encode(bgr: np.ndarray, fmt: str, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(f".{fmt}", bgr, params)
    if not ok:
        raise ImageRejected("encode_error", f"OpenCV could not encode {bgr.shape} as {fmt}")
    return buf.tobytes()
