"""Schemas of the first two stages: the URL manifest (query) and the downloaded images (download)."""

from __future__ import annotations

import pyarrow as pa

from schemas.base import TableSchema, register

# One row per (identity, URL). `sample_id` is a deterministic hash of (source_label, url), so re-running the
# query stage on the same input gives the same ids, and ids stay unique when one URL serves two names.
MANIFEST = register(
    TableSchema(
        name="manifest",
        version=2,
        renames={1: {"label": "source_label"}},
        schema=pa.schema(
            [
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("source_label", pa.string(), nullable=False),  # identity label as given by the source
                pa.field("name", pa.string(), nullable=False),  # human-readable identity name (may equal source_label)
                pa.field("url", pa.string(), nullable=False),
                pa.field("source_idx", pa.string()),  # WebFace260M global index when the input has one
            ]
        ),
    )
)

# One row per manifest row, success or not: the status stays, so a retry pass can find the failures.
DOWNLOAD = register(
    TableSchema(
        name="download",
        version=2,
        renames={1: {"label": "source_label", "sha256": "image_sha256"}},
        schema=pa.schema(
            [
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("source_label", pa.string(), nullable=False),
                pa.field("name", pa.string(), nullable=False),
                pa.field("url", pa.string(), nullable=False),
                pa.field("status", pa.string(), nullable=False),  # "success" or a drop reason
                pa.field("error", pa.string()),  # img2dataset's error message for failures
                pa.field("image", pa.binary()),  # encoded image (JPEG by default) after the border resize
                pa.field("width", pa.int32()),
                pa.field("height", pa.int32()),
                pa.field("original_width", pa.int32()),
                pa.field("original_height", pa.int32()),
                pa.field("image_sha256", pa.string()),  # of `image`
            ]
        ),
    )
)
