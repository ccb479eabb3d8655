"""timm feature extractors with named stages and offline weight resolution."""

from adtrain.backbones.extractor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    build_extractor,
)
from adtrain.backbones.loading import load_into, read_state_dict
from adtrain.backbones.weights import resolve_weights

__all__ = [
    "FeatureExtractor",
    "build_extractor",
    "resolve_weights",
    "read_state_dict",
    "load_into",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
