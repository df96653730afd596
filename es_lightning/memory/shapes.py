"""What memory needs to know about a model, read from its config alone (no weights are loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Architectures whose MLP is up -> act -> down (two matrices); the rest (Llama, Qwen, Mistral, Gemma, ...) are gated
# (three).
NON_GATED = frozenset({"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "starcoder2"})


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a concrete dtype name (``auto`` must be resolved first, see
    ``models.loading.dtype_name``)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"Unknown dtype {dtype!r} for a memory estimate: use one of {sorted(DTYPE_BYTES)}.")
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only LM that set its memory: width, depth, vocabulary, MLP width, attention heads."""

    name: str
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True
    tied_embeddings: bool = False
    positions: int = 0  # learned position embeddings (GPT-2); 0 for rotary models

    @property
    def parameters(self) -> int:
        """Parameter count from the sizes (biases left out: well under 0.1% for these models)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        block = attention + mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.positions * self.hidden
        return self.layers * block + embeddings + self.hidden

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of all weights in ``dtype`` (the whole model is loaded even when the forward stops early)."""
        return self.parameters * dtype_bytes(dtype)


def _first(config, names: tuple[str, ...], default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def shape_from_config(config, name: str = "model") -> ModelShape:
    """A :class:`ModelShape` from a transformers config (the text part of a multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, ("hidden_size", "n_embd", "d_model"))
    layers = _first(text, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first(text, ("num_attention_heads", "n_head"))
    if not all(isinstance(v, int) for v in (hidden, layers, heads)):
        raise ValueError(
            f"Cannot read the width, depth and heads of {name!r} from its config ({type(config).__name__})."
        )
    model_type = getattr(text, "model_type", "")
    return ModelShape(
        name=name,
        hidden=hidden,
        layers=layers,
        vocab=int(_first(text, ("vocab_size",), 0)),
        intermediate=int(_first(text, ("intermediate_size", "n_inner", "ffn_dim"), 4 * hidden)),
        heads=heads,
        kv_heads=int(_first(text, ("num_key_value_heads",), heads)),
        head_dim=int(_first(text, ("head_dim",), hidden // heads)),
        gated_mlp=model_type not in NON_GATED,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        positions=int(_first(text, ("n_positions",), 0)) if model_type == "gpt2" else 0,
    )


def read_shape(directory: str | Path, name: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of a local model directory, from its ``config.json`` only."""
    from transformers import AutoConfig

    return shape_from_config(AutoConfig.from_pretrained(directory), name or str(directory))
