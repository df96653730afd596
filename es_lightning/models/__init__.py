"""Model loading (built-in GGUF, local dirs, Hub ids), decoder-block access and hidden-state capture."""

from es_lightning.models.capture import capture_hidden_states, pool
from es_lightning.models.layers import get_blocks, hidden_size, num_layers
from es_lightning.models.loading import LoadedModel, load_model, resolve_model_dir
from es_lightning.models.registry import BUILTIN_MODELS

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "capture_hidden_states",
    "get_blocks",
    "hidden_size",
    "load_model",
    "num_layers",
    "pool",
    "resolve_model_dir",
]
