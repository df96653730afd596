"""Config and tokenizer files of a transformers 5 checkpoint, completed so transformers 4.x reads them the same way.

What transformers 5 writes and 4.x misreads, silently or with an error:

* ``config.json``: the RoPE settings live only in ``rope_parameters``. 4.x reads ``rope_theta`` and
  ``rope_scaling`` (gpt_neox: ``rotary_emb_base`` and ``rotary_pct``) and falls back to their defaults
  (theta 10000, no scaling) without a word: a model trained with theta 100000 gives other logits.
* ``config.json``: ``dtype``; older 4.x releases (before 4.56) read only ``torch_dtype``.
* ``tokenizer_config.json``: ``tokenizer_class: TokenizersBackend``, a class 4.x does not have (it is
  ``PreTrainedTokenizerFast``, which 5.x keeps as an alias, though 4.x's returns ``token_type_ids`` too, which
  ``generate`` refuses, unless ``model_input_names`` says otherwise), and ``extra_special_tokens`` as a list,
  which 4.x takes for a dict of named tokens and fails on (the list is 4.x's ``additional_special_tokens``).

The 4.x keys are added beside the 5.x ones with the values 5.x reads, and 5.x turns them back into the very same
settings, so both read one model. ``tests/test_export_hf_compat.py`` loads an export under each version in
:data:`CHECKED_TRANSFORMERS` and compares its logits with hook steering.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The 4.x releases tests/test_export_hf_compat.py installs and checks an export against (the pins it needs).
CHECKED_TRANSFORMERS: dict[str, tuple[str, ...]] = {
    "4.57.1": ("transformers==4.57.1", "huggingface-hub==0.36.2", "tokenizers==0.22.2"),
}

# 4.x's names for the RoPE base and the rotary fraction, where an architecture does not use the usual ones.
_ROPE_THETA_KEY = {"gpt_neox": "rotary_emb_base"}
_ROTARY_FRACTION_KEY = {"gpt_neox": "rotary_pct"}

# 5.x tokenizer classes under their 4.x names.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def legacy_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The 4.x keys (RoPE, ``torch_dtype``) that say what ``config``, a 5.x ``config.json``, says."""
    legacy: dict[str, Any] = {}
    if config.get("dtype") is not None:
        legacy["torch_dtype"] = config["dtype"]
    rope = config.get("rope_parameters")
    if not rope:
        return legacy
    if any(isinstance(value, dict) for value in rope.values()):
        raise ValueError(
            f"The {config.get('model_type')!r} config has RoPE settings per layer type ({sorted(rope)}), which "
            f"transformers 4.x cannot read from one rope_theta/rope_scaling, so no hf export reads the same in both. "
            f"Use the gguf export or es-lightning's hook steering for this model."
        )
    model_type = config.get("model_type", "")
    legacy[_ROPE_THETA_KEY.get(model_type, "rope_theta")] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        legacy[_ROTARY_FRACTION_KEY.get(model_type, "partial_rotary_factor")] = rope["partial_rotary_factor"]
    scaling = {key: value for key, value in rope.items() if key not in ("rope_theta", "partial_rotary_factor")}
    legacy["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
    return legacy


def legacy_tokenizer_keys(tokenizer_config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The keys of a 5.x ``tokenizer_config.json`` that 4.x needs changed (new values) and those it must not see."""
    from transformers import TokenizersBackend

    changed: dict[str, Any] = {}
    dropped: list[str] = []
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if tokenizer_class in _TOKENIZER_CLASSES:
        changed["tokenizer_class"] = _TOKENIZER_CLASSES[tokenizer_class]
        if "model_input_names" not in tokenizer_config:  # 4.x's class also returns token_type_ids
            changed["model_input_names"] = list(TokenizersBackend.model_input_names)
    extra = tokenizer_config.get("extra_special_tokens")
    if isinstance(extra, list):
        changed["additional_special_tokens"] = extra
        dropped.append("extra_special_tokens")
    return changed, dropped


def _rewrite(path: Path, changed: dict[str, Any], dropped: list[str]) -> None:
    """Set ``changed`` and remove ``dropped`` in the JSON file ``path`` (keys sorted, as transformers writes them)."""
    data = json.loads(path.read_text())
    data = {key: value for key, value in data.items() if key not in dropped}
    data.update(changed)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_readable_by_4x(folder: Path) -> dict[str, Any]:
    """Complete the ``config.json`` and ``tokenizer_config.json`` that 5.x wrote in ``folder`` for 4.x readers.

    Returns what the export record keeps: the transformers that wrote the folder, the versions that read it the
    same way (the 4.x ones :data:`CHECKED_TRANSFORMERS` lists and the writer, which reads the completed config back
    to the same RoPE settings and dtype here, or this raises) and the keys set per file (``-key``: removed).
    """
    import transformers
    from transformers import AutoConfig

    written = AutoConfig.from_pretrained(folder)
    config_path, tokenizer_path = folder / "config.json", folder / "tokenizer_config.json"
    config_keys = legacy_config_keys(json.loads(config_path.read_text()))
    _rewrite(config_path, config_keys, [])
    reread = AutoConfig.from_pretrained(folder)
    for name in ("rope_parameters", "dtype"):
        if getattr(reread, name, None) != getattr(written, name, None):
            raise RuntimeError(
                f"transformers {transformers.__version__} reads the 4.x keys added to {config_path} as {name}="
                f"{getattr(reread, name, None)!r}, not {getattr(written, name, None)!r}, so 4.x and 5.x would load "
                f"different models. Fix: export with the transformers 5 release es-lightning's tests pin, or update "
                f"es_lightning/export/hf_compat.py for this one."
            )
    changes = {"config.json": sorted(config_keys)}
    if tokenizer_path.is_file():
        tokenizer_keys, dropped = legacy_tokenizer_keys(json.loads(tokenizer_path.read_text()))
        _rewrite(tokenizer_path, tokenizer_keys, dropped)
        changes["tokenizer_config.json"] = sorted([*tokenizer_keys, *(f"-{key}" for key in dropped)])
    return {
        "written_with": transformers.__version__,
        "checked_with": [*CHECKED_TRANSFORMERS, transformers.__version__],
        "keys_for_4x": changes,
    }
