"""Schemas of the clean stage: the identity selection, and the validation-set center files.

The selection has one row per faces row, in the faces shard the row came from: either kept with its new
identity, or dropped with a reason code (`dbscan_noise`, `not_largest_cluster`, `same_photo`,
`low_face_score`, `ambiguous_name`, `ambiguous_identity`, `near_duplicate`, `val_overlap:<set>`, `too_few_images`,
`bad_feature`); a `near_duplicate` row that copies another photo names the row it copies
(`duplicate_of`). Bundle joins it back to persons/faces per shard by `person_id`.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.base import TableSchema, register

CLEAN = register(
    TableSchema(
        name="clean",
        version=3,
        renames={2: {"label": "source_label"}},
        schema=pa.schema(
            [
                pa.field("person_id", pa.string(), nullable=False),
                pa.field("sample_id", pa.string(), nullable=False),
                pa.field("detection_index", pa.int32(), nullable=False),
                pa.field("source_label", pa.string(), nullable=False),  # source identity label (the query name)
                pa.field("name", pa.string(), nullable=False),
                pa.field("identity", pa.string()),  # new identity id; null when dropped
                pa.field("kept", pa.bool_(), nullable=False),
                pa.field("reason", pa.string()),  # null when kept, else a reason code
                pa.field("duplicate_of", pa.string()),  # person_id of the kept copy, for copies of a photo
            ]
        ),
    )
)

# One row per validation-set center. Every row repeats the set, the embedder and its config, so a file
# can never be separated from what made it; the clean stage refuses centers of another embedder.
VALSET_CENTERS = register(
    TableSchema(
        name="valset_centers",
        version=1,
        schema=pa.schema(
            [
                pa.field("set", pa.string(), nullable=False),  # e.g. "lfw", "agedb_30"
                pa.field("item", pa.string(), nullable=False),  # identity folder, or "img<index>" for .bin sets
                pa.field("n_images", pa.int32(), nullable=False),
                pa.field("embedder", pa.string(), nullable=False),
                pa.field("embedder_config", pa.string(), nullable=False),  # JSON of the embedder settings
                pa.field("center", pa.list_(pa.float32()), nullable=False),  # L2-normalised
            ]
        ),
    )
)
