"""The metadata record of one WebDataset sample (`<key>.json` in the bundle shards).

Coordinates are pixels of the 384x384 bundle image (x right, y down); `visibility` is the pose model's
keypoint confidence in [0, 1] (a point counts as visible when >= KEYPOINT_VISIBLE). Face fields are null
when no face was found. The training loader builds the model's 22-point input from this record.
"""

from __future__ import annotations

from typing import Any

from schemas.base import SchemaError

SAMPLE_VERSION = 2
# Versions whose only change was renamed fields: version -> {old name: new name} (read by `upgrade_sample`).
SAMPLE_RENAMES: dict[int, dict[str, str]] = {1: {"label": "class_id"}}
IMAGE_SIZE = 384
NUM_BODY_KEYPOINTS = 17
KEYPOINT_VISIBLE = 0.5

# field -> (python types accepted, required)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "key": ((str,), True),
    "class_id": ((int,), True),  # contiguous class id of the identity within its split, 0..N-1
    "identity": ((str,), True),  # stable identity id from the clean stage
    "name": ((str,), True),
    "split": ((str,), True),
    "url": ((str,), True),
    "image_sha256": ((str,), True),  # of the downloaded source image
    "sample_id": ((str,), True),
    "detection_index": ((int,), True),
    "keypoints": ((list,), True),  # 17 x [x, y, visibility] in the 384 frame
    "body_box": ((list,), True),  # padded person box [x1, y1, x2, y2] in the source image
    "content_box": ((list,), True),  # the non-padding area [x1, y1, x2, y2] in the 384 frame
    "person_score": ((float, int), True),
    "face_box": ((list, type(None)), False),  # [x1, y1, x2, y2] in the 384 frame
    "face_landmarks": ((list, type(None)), False),  # 5 x [x, y] ArcFace order, in the 384 frame
    "face_score": ((float, int, type(None)), False),
    "crop_size": ((list,), False),  # [width, height] of the body crop the sample was rendered from, source px
    "role": ((str, type(None)), False),  # WebBody-test: "query" | "gallery"; training samples: "train"
    "subsets": ((str,), False),  # comma-separated train-subset names (e.g. "12m,4m"), "" for none
    "pipeline_version": ((str,), True),
    "config_hash": ((str,), True),
    "version": ((int,), True),
}


def upgrade_sample(meta: dict[str, Any]) -> dict[str, Any]:
    """A record of an older, rename-only version with today's field names (a new dict); others unchanged."""
    version = meta.get("version")
    if not isinstance(version, int) or version >= SAMPLE_VERSION or any(
        v not in SAMPLE_RENAMES for v in range(version, SAMPLE_VERSION)
    ):
        return meta
    out = dict(meta)
    for v in range(version, SAMPLE_VERSION):
        out = {SAMPLE_RENAMES[v].get(k, k): val for k, val in out.items()}
    out["version"] = SAMPLE_VERSION
    return out


def validate_sample(meta: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Raise SchemaError naming the field if `meta` is not a valid sample record; return it otherwise.

    A record of an older rename-only version is returned upgraded (`upgrade_sample`): use the return value.
    """
    loc = f" ({where})" if where else ""
    meta = upgrade_sample(meta)
    for field, (types, required) in _FIELDS.items():
        if field not in meta:
            if required:
                raise SchemaError(f"sample{loc}: missing field '{field}'")
            continue
        if not isinstance(meta[field], types) or isinstance(meta[field], bool) and bool not in types:
            raise SchemaError(f"sample{loc}: field '{field}' has type {type(meta[field]).__name__}")
    if meta["version"] != SAMPLE_VERSION:
        raise SchemaError(f"sample{loc}: version {meta['version']}, this code reads {SAMPLE_VERSION}")
    kps = meta["keypoints"]
    if len(kps) != NUM_BODY_KEYPOINTS or any(len(p) != 3 for p in kps):
        raise SchemaError(f"sample{loc}: field 'keypoints' must be 17 x [x, y, visibility]")
    for x, y, v in kps:
        if not (0.0 <= v <= 1.0):
            raise SchemaError(f"sample{loc}: field 'keypoints' visibility {v} outside [0, 1]")
        if v >= KEYPOINT_VISIBLE and not (0.0 <= x <= IMAGE_SIZE and 0.0 <= y <= IMAGE_SIZE):
            raise SchemaError(f"sample{loc}: field 'keypoints' visible point ({x}, {y}) outside the image")
    for box_field in ("body_box", "content_box", "face_box"):
        box = meta.get(box_field)
        if box is not None and (len(box) != 4 or box[2] < box[0] or box[3] < box[1]):
            raise SchemaError(f"sample{loc}: field '{box_field}' must be [x1, y1, x2, y2] with x2>=x1, y2>=y1")
    size = meta.get("crop_size")
    if size is not None and (len(size) != 2 or any(not isinstance(v, int) or v < 1 for v in size)):
        raise SchemaError(f"sample{loc}: field 'crop_size' must be [width, height] in pixels")
    if meta.get("role") not in (None, "train", "query", "gallery"):
        raise SchemaError(f"sample{loc}: field 'role' is {meta['role']!r}, not train, query or gallery")
    lm = meta.get("face_landmarks")
    if lm is not None and (len(lm) != 5 or any(len(p) != 2 for p in lm)):
        raise SchemaError(f"sample{loc}: field 'face_landmarks' must be 5 x [x, y]")
    return meta
