"""Memory estimates per stage from the configs alone, and checks that refuse work that will not fit."""

from es_lightning.memory.check import announce, check_devices, check_fits, check_model_fits, check_weights_fit
from es_lightning.memory.estimate import (
    StageEstimate,
    autoencoder_estimate,
    cache_bytes,
    cache_estimate,
    capture_estimate,
    evaluation_estimate,
    pair_search_estimate,
    rfm_estimate,
)
from es_lightning.memory.plan import RunSettings, estimate_stages
from es_lightning.memory.shapes import ModelShape, read_shape, shape_from_config

__all__ = [
    "ModelShape",
    "RunSettings",
    "StageEstimate",
    "announce",
    "autoencoder_estimate",
    "cache_bytes",
    "cache_estimate",
    "capture_estimate",
    "check_devices",
    "check_fits",
    "check_model_fits",
    "check_weights_fit",
    "estimate_stages",
    "evaluation_estimate",
    "pair_search_estimate",
    "read_shape",
    "rfm_estimate",
    "shape_from_config",
]
