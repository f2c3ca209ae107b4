"""WebBody shard data for SapiensID: streaming, decoding, transforms, resumable batching."""

from sapiensid.data.loader import BatchPlan, StreamLoader, StreamPosition, StreamSpec, to_model_inputs
from sapiensid.data.shards import DecodeError, SkipCounter, decode_sample, expand_urls, iter_decoded, iter_raw
from sapiensid.data.transforms import (
    NUM_KEYPOINTS,
    AugmentConfig,
    augment,
    foreground_mask_white,
    hflip_sample,
    keypoints22_from_meta,
    normalise_keypoints,
    square_pad_resize,
)

__all__ = [
    "NUM_KEYPOINTS",
    "AugmentConfig",
    "BatchPlan",
    "DecodeError",
    "SkipCounter",
    "StreamLoader",
    "StreamPosition",
    "StreamSpec",
    "augment",
    "decode_sample",
    "expand_urls",
    "foreground_mask_white",
    "hflip_sample",
    "iter_decoded",
    "iter_raw",
    "keypoints22_from_meta",
    "normalise_keypoints",
    "square_pad_resize",
    "to_model_inputs",
]
