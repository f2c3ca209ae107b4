"""Short, stable status codes for img2dataset's free-text error messages.

img2dataset stores `str(exception)` from urllib (or from our resizer) per failed sample. Stats and the
retries need a small vocabulary instead: `http_404`, `connection_refused`, `timeout`, ... The raw
message stays in the DOWNLOAD table's `error` column.
"""

from __future__ import annotations

import re

# Failures worth a second attempt (transient network or server trouble).
RETRYABLE = frozenset(
    {
        "timeout",
        "connection_reset",
        "connection_error",
        "incomplete_read",
        "dns_error",
        "http_429",
        "http_500",
        "http_502",
        "http_503",
        "http_504",
        "download_error",
        "task_failed",  # every attempt of the shard's task failed (runner.py)
    }
)

# Codes our own resizer (images.py) and URL guard (urlsafety.py) put at the start of a message.
OWN_CODES = (
    "private_address",
    "body_too_large",
    "bad_url",
    "dns_error",
    "empty_body",
    "not_an_image",
    "decode_error",
    "truncated",
    "image_too_large",
    "encode_error",
    "resize_error",
)

_HTTP = re.compile(r"HTTP Error (\d{3})")
_RULES: tuple[tuple[str, str], ...] = (
    ("X-Robots-Tag", "optout_header"),
    ("unknown url type", "bad_url"),
    ("no host given", "bad_url"),
    ("Connection refused", "connection_refused"),
    ("timed out", "timeout"),
    ("Connection reset", "connection_reset"),
    ("Remote end closed connection", "connection_error"),
    ("IncompleteRead", "incomplete_read"),
    ("Name or service not known", "dns_error"),
    ("Temporary failure in name resolution", "dns_error"),
    ("nodename nor servname", "dns_error"),
    ("CERTIFICATE_VERIFY_FAILED", "ssl_error"),
    ("SSL", "ssl_error"),
    ("redirect error", "redirect_loop"),
    ("hash mismatch", "hash_mismatch"),
    ("Image decoding error", "decode_error"),
    ("image area too large", "image_too_large"),
    ("No route to host", "connection_error"),
    ("Network is unreachable", "connection_error"),
)


def status_code(error: str | None, i2d_status: str | None = None) -> str:
    """Map one img2dataset (status, error_message) pair to a short code; "success" for a success."""
    if i2d_status == "success":
        return "success"
    msg = error or ""
    body = msg.removeprefix("<urlopen error ").lstrip()
    for code in OWN_CODES:
        if body.startswith(code + ":") or body == code:
            return code
    m = _HTTP.search(msg)
    if m:
        return f"http_{m.group(1)}"
    for needle, code in _RULES:
        if needle in msg:
            return code
    if i2d_status == "failed_to_resize":
        return "decode_error"
    return "download_error"
