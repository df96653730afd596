"""Where each architecture keeps its decoder blocks, and its hidden size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

# model_type -> attribute path of the decoder block list, relative to the *ForCausalLM model.
BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


def _resolve(model: nn.Module, path: str) -> nn.ModuleList | None:
    obj: object = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.ModuleList) else None


def get_blocks(model: nn.Module, block_path: str | None = None) -> nn.ModuleList:
    """Return the list of decoder blocks of ``model``.

    ``block_path`` (for example ``"model.layers"``) overrides the built-in table for architectures it
    does not know.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    candidates = [block_path] if block_path else [BLOCK_PATHS[model_type]] if model_type in BLOCK_PATHS else []
    for path in candidates:
        blocks = _resolve(model, path)
        if blocks is not None:
            return blocks
    if block_path:
        raise ValueError(
            f"block_path={block_path!r} does not name an nn.ModuleList on this {model_type!r} model. "
            f"Print the model and pass the dotted path of its decoder block list (e.g. 'model.layers')."
        )
    raise ValueError(
        f"Unknown architecture {model_type!r}: es-lightning does not know where its decoder blocks are. "
        f"Set block_path to the dotted attribute path of the block list (known: "
        f"{sorted(set(BLOCK_PATHS.values()))})."
    )


def num_layers(model: nn.Module, block_path: str | None = None) -> int:
    """Number of decoder blocks."""
    return len(get_blocks(model, block_path))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the blocks' output size)."""
    config: Any = model.config  # a transformers config, which nn.Module's __getattr__ types as Tensor | Module
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot find the hidden size in the config of {type(model).__name__}.")


def validate_layers(layers: Sequence[int], total: int, who: str) -> list[int]:
    """Check a layer list against a model's depth; return it sorted and de-duplicated."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"The {who} layer list is empty: give at least one block index in 0..{total - 1}.")
    bad = [layer for layer in layers if not isinstance(layer, int) or not 0 <= layer < total]
    if bad:
        raise ValueError(
            f"{who} layer index {bad} out of range: this model has {total} blocks, so use indices 0..{total - 1}."
        )
    return sorted(set(layers))
