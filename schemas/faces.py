"""Schema of the faces stage: one row per person (body crop) with a usable face.

Coordinates are in body-crop pixels (the `crop` image of the persons table), so the bundle stage can map
them into its own resized crop. The feature is stored as it came out of the embedder (not L2-normalised,
as the official pipeline does: the norm is informative), as little-endian float16 bytes plus its float32 norm.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import TableSchema, register

FACES = register(
    TableSchema(
        name="faces",
        version=2,
        renames={1: {"label": "source_label"}},
        schema=pa.schema(
            [
                pa.field("person_id", pa.string(), nullable=False),
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("detection_index", pa.int32(), nullable=False),
                pa.field("source_label", pa.string(), nullable=False),
                pa.field("name", pa.string(), nullable=False),
                # x1, y1, x2, y2 of the detected face, body-crop px
                pa.field("face_box", pa.list_(pa.float32(), 4), nullable=False),
                # 5 x (x, y) in ArcFace order: image-left eye, image-right eye, nose, left/right mouth corner
                pa.field("face_landmarks", pa.list_(pa.float32(), 10), nullable=False),
                pa.field("face_score", pa.float32(), nullable=False),  # detector score; filtered in clean
                pa.field("face_size_px", pa.float32(), nullable=False),  # max(face box w, h), body-crop px
                pa.field("feature", pa.binary(), nullable=False),  # float16 little-endian, feature_dim values
                pa.field("feature_dim", pa.int32(), nullable=False),
                pa.field("feature_norm", pa.float32(), nullable=False),  # L2 norm of the float32 feature
                pa.field("embedder", pa.string(), nullable=False),  # a registered embedder (pipeline/faces/embedders.py)
            ]
        ),
    )
)
