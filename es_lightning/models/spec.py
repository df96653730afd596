"""What the config says about one model, and what can be known about it without loading its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from es_lightning.models.layers import validate_layers
from es_lightning.models.loading import fingerprint_model_dir, resolve_dtype, resolve_model_dir


@dataclass
class ModelSpec:
    """One model of the pair as configured.

    ``name``: a built-in name, a local directory or a Hub id. ``layers``: block indices to capture
    (``None`` = every block). ``chat_template``: wrap prompts in the tokenizer's chat template.
    ``max_length``: longer texts are truncated from the left (one warning). ``block_path``: dotted path of
    the decoder block list for architectures es-lightning does not know.
    """

    name: str
    layers: list[int] | None = None
    chat_template: bool = False
    dtype: str = "float32"
    max_length: int = 512
    block_path: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model: where its weights are, their fingerprint, depth, width and the captured layers."""

    name: str
    directory: str
    fingerprint: str
    model_type: str
    num_layers: int
    hidden_size: int
    layers: tuple[int, ...]


def describe(spec: ModelSpec, cache_dir: str | Path | None = None, who: str = "model") -> ModelInfo:
    """Resolve ``spec`` and read its config (no weights are loaded) to validate the layer list."""
    from transformers import AutoConfig

    resolve_dtype(spec.dtype)
    directory = resolve_model_dir(spec.name, cache_dir)
    config = AutoConfig.from_pretrained(directory)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = next((getattr(text, n) for n in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(text, n)), None)
    width = next((getattr(text, n) for n in ("hidden_size", "n_embd", "d_model") if hasattr(text, n)), None)
    if not isinstance(depth, int) or not isinstance(width, int):
        raise ValueError(f"Cannot read the depth and width of {spec.name!r} from its config ({type(config).__name__}).")
    layers = validate_layers(list(range(depth)) if spec.layers is None else spec.layers, depth, who)
    if spec.max_length < 8:
        raise ValueError(f"{who} max_length={spec.max_length} is too small: use at least 8 tokens.")
    return ModelInfo(
        spec.name,
        str(directory),
        fingerprint_model_dir(Path(directory)),
        config.model_type,
        depth,
        width,
        tuple(layers),
    )
