"""pyarrow schemas and validators for every table and shard record WebBody writes."""

from schemas.base import REGISTRY, SchemaError, TableSchema, register
from schemas.bundle import BUNDLE_CENTERS, BUNDLE_INDEX
from schemas.clean import CLEAN, VALSET_CENTERS
from schemas.faces import FACES
from schemas.persons import PERSONS
from schemas.sample import validate_sample
from schemas.tables import DOWNLOAD, MANIFEST

__all__ = [
    "BUNDLE_CENTERS",
    "BUNDLE_INDEX",
    "CLEAN",
    "DOWNLOAD",
    "FACES",
    "MANIFEST",
    "PERSONS",
    "REGISTRY",
    "SchemaError",
    "TableSchema",
    "register",
    "VALSET_CENTERS",
    "validate_sample",
]
