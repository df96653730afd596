"""``hf``: a ``transformers`` checkpoint of the target with the steering folded into its weights.

A constant ``delta_j`` added to block ``j``'s output is the same as a bias ``delta_j`` on the block's last
projection before the residual add, provided nothing normalises that projection's output inside the block and
nothing else in the block reads it: the MLP's output projection, not the attention's (the MLP reads that).
Each supported architecture names that projection and the config switch (if any) that gives it a bias; the
switch also gives biases to sibling projections (llama's ``mlp_bias`` covers gate/up/down), which are set to
zero, and to the projection in every other block, also zero. The result loads with plain
``AutoModelForCausalLM.from_pretrained`` (so also in vLLM or TGI) and steers with no hooks, under transformers 5
and 4.x alike (:mod:`es_lightning.export.hf_compat` adds the config and tokenizer keys 4.x reads). It steers every
position, like ``positions: all``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from es_lightning import __version__
from es_lightning.export.hf_compat import make_readable_by_4x
from es_lightning.export.source import EXPORT_RECORD, ExportSource, TargetModel, check_output
from es_lightning.io import atomic_directory
from es_lightning.models.layers import get_blocks, hidden_size
from es_lightning.models.loading import resolve_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class FoldRecipe:
    """Where a block's output bias lives: ``projection`` (relative to the block) and the config switch for it."""

    projection: str
    switch: str | None = None  # config flag that gives the projection a bias; None: it always has one
    requires: dict = field(default_factory=dict)  # config values the fold needs (else refused)
    as_llama: dict | None = None  # rewrite the checkpoint as llama with these settings (same weights and names)
    note: str = ""


RECIPES: dict[str, FoldRecipe] = {
    "llama": FoldRecipe("mlp.down_proj", "mlp_bias", note="mlp_bias also adds zero gate_proj/up_proj biases"),
    "gpt2": FoldRecipe("mlp.c_proj", note="the projection already has a bias"),
    "gpt_neox": FoldRecipe("mlp.dense_4h_to_h", note="the projection already has a bias"),
    "opt": FoldRecipe(
        "fc2",
        "enable_bias",
        requires={"do_layer_norm_before": True},
        note="enable_bias also adds zero biases to the other projections",
    ),
    # Without sliding windows these are llama with other defaults (qwen2: plus q/k/v biases), and their
    # weights have llama's names, so the fold is written as a llama checkpoint with mlp_bias.
    "qwen2": FoldRecipe(
        "mlp.down_proj",
        "mlp_bias",
        requires={"sliding_window": None},
        as_llama={"attention_bias": True},
        note="written as llama: attention_bias keeps the q/k/v biases (o_proj bias zero), mlp_bias",
    ),
    "mistral": FoldRecipe(
        "mlp.down_proj",
        "mlp_bias",
        requires={"sliding_window": None},
        as_llama={"attention_bias": False},
        note="written as llama with mlp_bias",
    ),
}

# Config keys of the rewritten architectures that llama does not have (all about sliding windows).
_NOT_LLAMA = (
    "model_type",
    "architectures",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "transformers_version",
)

# Why the other known architectures cannot be folded with a config change alone.
_MID_BLOCK = (
    "only the attention output projection can get a bias (attention_bias), and the same block's MLP "
    "reads that output, so the bias is not a constant shift of the block's output"
)
_POST_NORMS = (
    "the block normalises its attention and MLP outputs (post-norms), so a bias before them is not a constant shift"
)
REFUSED: dict[str, str] = {
    "qwen3": _MID_BLOCK,
    "gemma": _MID_BLOCK,
    "olmo": _MID_BLOCK,
    "mixtral": "no projection has a bias and no config switch adds one",
    "phi3": "no projection has a bias and no config switch adds one",
    "gemma2": _POST_NORMS,
    "gemma3_text": _POST_NORMS,
    "olmo2": _POST_NORMS,
}


def recipe_for(config) -> FoldRecipe:
    """The fold recipe for a model config, or a ``ValueError`` that names the supported architectures."""
    model_type = getattr(config, "model_type", "")
    supported = ", ".join(sorted(RECIPES))
    if model_type not in RECIPES:
        reason = REFUSED.get(model_type, "es-lightning knows no bias that adds a constant to its blocks' outputs")
        raise ValueError(
            f"The hf export cannot fold steering into a {model_type!r} model: {reason}. Supported architectures: "
            f"{supported}. Use the gguf or lm-eval export, or es-lightning's own hook steering, for this model."
        )
    recipe = RECIPES[model_type]
    for key, value in recipe.requires.items():
        if getattr(config, key, None) != value:
            why = (
                " (a sliding window: it cannot be written as a llama checkpoint)"
                if key == "sliding_window"
                else f"; with {key}={getattr(config, key, None)!r} the block normalises after the residual add, "
                f"so no bias adds a constant to its output"
            )
            raise ValueError(
                f"The hf export cannot fold steering into this {model_type!r} model: it needs {key}={value!r} "
                f"(got {getattr(config, key, None)!r}){why}."
            )
    return recipe


def fold(model: torch.nn.Module, deltas: dict[int, torch.Tensor], block_path: str | None = None) -> torch.nn.Module:
    """A copy of ``model`` (float32) whose block ``j`` adds ``deltas[j]`` to its output through a bias."""
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(model.config)
    width = hidden_size(model)
    config = cast("PreTrainedConfig", copy.deepcopy(model.config))  # nn.Module types .config as Tensor | Module
    if recipe.as_llama is not None:
        from transformers import LlamaConfig

        data = {key: value for key, value in config.to_dict().items() if key not in _NOT_LLAMA}
        config = LlamaConfig(**{**data, **recipe.as_llama, recipe.switch: True})
        config.architectures = ["LlamaForCausalLM"]
    if recipe.as_llama is not None or (recipe.switch and not getattr(config, recipe.switch, False)):
        assert recipe.switch is not None  # every as_llama recipe names its switch
        setattr(config, recipe.switch, True)
        folded = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = folded.load_state_dict(model.state_dict(), strict=False)
        tied = set(getattr(folded, "_tied_weights_keys", None) or [])
        missing = [key for key in missing if key not in tied and not key.startswith("lm_head")]
        if unexpected or any(not key.endswith(".bias") for key in missing):
            raise RuntimeError(f"Folding lost weights: missing={missing} unexpected={unexpected}")
        with torch.no_grad():
            params = dict(folded.named_parameters())
            for key in missing:
                params[key].zero_()
    else:
        folded = copy.deepcopy(model).float()
    folded.eval()
    blocks = get_blocks(folded, block_path)
    with torch.no_grad():
        for layer, delta in deltas.items():
            if not 0 <= layer < len(blocks):
                raise ValueError(f"Layer {layer} is out of range for this model's {len(blocks)} blocks.")
            if tuple(delta.shape) != (width,):
                raise ValueError(
                    f"The vector of layer {layer} has shape {tuple(delta.shape)}, the model's width is {width}."
                )
            bias = blocks[layer].get_submodule(recipe.projection).bias
            if not isinstance(bias, torch.Tensor) or bias.shape != (width,):
                raise RuntimeError(
                    f"{type(model).__name__} block {layer}: {recipe.projection} has no bias of width {width}."
                )
            bias.add_(delta.to(bias.dtype))
    return folded


def export_hf(
    source: ExportSource,
    path: str | Path,
    target: TargetModel,
    overwrite: bool = False,
    dtype: str | None = None,
    block_path: str | None = None,
) -> Path:
    """Write the folded checkpoint of ``target`` for ``source`` to the folder ``path``; return it.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``) defaults to the dtype the target was saved in. The
    folder appears atomically (written under a temporary name, then renamed).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_output(path, overwrite, directory=True)
    config = AutoConfig.from_pretrained(target.directory)
    recipe = recipe_for(config)  # refuse before loading any weights
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(saved, str):
        saved = resolve_dtype(saved)
    out_dtype = resolve_dtype(dtype) if dtype else saved
    model = AutoModelForCausalLM.from_pretrained(target.directory, dtype=torch.float32)
    model.eval()
    folded = cast("PreTrainedModel", fold(model, source.deltas(), block_path).to(out_dtype))  # a copy of model
    del model
    tokenizer = AutoTokenizer.from_pretrained(target.directory)
    record = {
        "format": "es_lightning.hf_fold",
        "format_version": 1,
        "package_version": __version__,
        "method": source.method,
        "coefficient": source.coefficient,
        "coefficient_origin": source.coefficient_origin,
        "bundle": str(source.bundle_path),
        "layers": source.bundle.layers,
        "positions": "all",
        "target": {"name": target.name, "fingerprint": target.identity.fingerprint, "directory": str(target.directory)},
        "fold": {"projection": recipe.projection, "switch": recipe.switch, "note": recipe.note},
        "dtype": str(out_dtype).removeprefix("torch."),
    }
    with atomic_directory(path) as tmp:
        folded.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record["transformers"] = make_readable_by_4x(tmp)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return path
