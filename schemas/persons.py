"""Schema of the persons stage: one row per kept person (body crop, box, 17 COCO keypoints)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.base import SchemaError, TableSchema, register

NUM_KEYPOINTS = 17  # COCO-17: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles
KEYPOINT_VALUES = NUM_KEYPOINTS * 3  # x, y, confidence per point

# Coordinates are pixels of the downloaded image ("source image", usually the 640x640 white-bordered canvas)
# unless the column says crop. Keypoint confidence is Ultralytics' per-point score, kept as the visibility:
# coordinates are never zeroed to mean "invisible".
PERSONS = register(
    TableSchema(
        name="persons",
        version=2,
        renames={1: {"label": "source_label"}},
        schema=pa.schema(
            [
                pa.field("person_id", pa.string(), nullable=False),  # f"{sample_id}_{detection_index}"
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("detection_index", pa.int32(), nullable=False),  # rank by box confidence, 0-based
                pa.field("source_label", pa.string(), nullable=False),
                pa.field("name", pa.string(), nullable=False),
                pa.field("url", pa.string(), nullable=False),
                pa.field("image_sha256", pa.string()),
                pa.field("box", pa.list_(pa.float32()), nullable=False),  # padded box, source px, x1 y1 x2 y2
                pa.field("det_box", pa.list_(pa.float32()), nullable=False),  # detector's box before padding
                pa.field("box_score", pa.float32(), nullable=False),
                pa.field("keypoints", pa.list_(pa.float32()), nullable=False),  # 17 x [x, y, conf], source px
                pa.field("keypoints_crop", pa.list_(pa.float32()), nullable=False),  # same, crop px
                pa.field("crop", pa.binary(), nullable=False),  # encoded once; downstream decodes, never re-crops
                pa.field("crop_format", pa.string(), nullable=False),  # "jpg" or "png"
                pa.field("crop_x", pa.int32(), nullable=False),  # crop's top-left corner in source px
                pa.field("crop_y", pa.int32(), nullable=False),
                pa.field("crop_width", pa.int32(), nullable=False),
                pa.field("crop_height", pa.int32(), nullable=False),
                pa.field("image_width", pa.int32(), nullable=False),
                pa.field("image_height", pa.int32(), nullable=False),
            ]
        ),
    )
)

_LIST_LENGTHS = {"box": 4, "det_box": 4, "keypoints": KEYPOINT_VALUES, "keypoints_crop": KEYPOINT_VALUES}


def check_persons(table: pa.Table, where: str = "") -> pa.Table:
    """PERSONS.validate plus the fixed lengths of the list columns (pyarrow types cannot say them)."""
    table = PERSONS.validate(table, where)
    loc = f" in {where}" if where else ""
    for col, n in _LIST_LENGTHS.items():
        lengths = pc.list_value_length(table.column(col))
        bad = pc.sum(pc.not_equal(lengths, n)).as_py() or 0
        if bad:
            raise SchemaError(f"table 'persons'{loc}: column '{col}' must hold {n} values per row ({bad} rows do not)")
    return table
