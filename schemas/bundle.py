"""Schemas of the bundle output: the shard index (`index.parquet`) and the identity centers used by opt-out.

The index has one row per WebDataset sample. Offsets are byte positions in the shard file: `offset` is the
first member's tar header, `end` the byte after the last member's padded data, and `<ext>_offset` the start
of that member's data (so a reader can seek straight to an image). Checksums are sha256 of member bytes.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import TableSchema, register

BUNDLE_INDEX = register(
    TableSchema(
        name="bundle_index",
        version=2,
        renames={1: {"sha256": "member_sha256", "label": "class_id"}},
        schema=pa.schema(
            [
                pa.field("key", pa.string(), nullable=False),
                pa.field("split", pa.string(), nullable=False),  # "train" | "test"
                pa.field("shard", pa.string(), nullable=False),  # file name, webbody-{split}-{n:06d}.tar
                pa.field("position", pa.int32(), nullable=False),  # sample number inside the shard
                pa.field("offset", pa.int64(), nullable=False),
                pa.field("end", pa.int64(), nullable=False),
                pa.field("jpg_offset", pa.int64(), nullable=False),
                pa.field("jpg_size", pa.int64(), nullable=False),
                pa.field("json_offset", pa.int64(), nullable=False),
                pa.field("json_size", pa.int64(), nullable=False),
                pa.field("npy_offset", pa.int64()),  # null when the sample has no .face.npy
                pa.field("npy_size", pa.int64()),
                pa.field("member_sha256", pa.string(), nullable=False),  # of the .jpg member
                pa.field("json_sha256", pa.string(), nullable=False),
                pa.field("npy_sha256", pa.string()),
                pa.field("class_id", pa.int32(), nullable=False),  # contiguous per split at build time
                pa.field("identity", pa.string(), nullable=False),
                pa.field("name", pa.string(), nullable=False),
                pa.field("role", pa.string(), nullable=False),  # test: "query" | "gallery"; train: "train"
                pa.field("subsets", pa.list_(pa.string()), nullable=False),  # train subsets: "12m", "4m", ...
                pa.field("person_id", pa.string(), nullable=False),
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("url", pa.string(), nullable=False),
                pa.field("image_sha256", pa.string(), nullable=False),  # of the downloaded source image
                pa.field("kp_visible", pa.int32(), nullable=False),  # bit i set = COCO keypoint i visible
                pa.field("has_face", pa.bool_(), nullable=False),
            ]
        ),
    )
)

# Per-identity face-feature centers (sum of raw features, as the clean stage defines them), kept beside the
# shards so that `webbody remove --face` can find a subject from one photo without the build directory.
BUNDLE_CENTERS = register(
    TableSchema(
        name="bundle_centers",
        version=1,
        schema=pa.schema(
            [
                pa.field("identity", pa.string(), nullable=False),
                pa.field("center", pa.binary(), nullable=False),  # float32 little-endian
                pa.field("dim", pa.int32(), nullable=False),
                pa.field("count", pa.int32(), nullable=False),
                pa.field("embedder", pa.string(), nullable=False),
            ]
        ),
    )
)
