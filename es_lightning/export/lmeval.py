"""``lm-eval``: the steer file of lm-evaluation-harness's ``steered`` model (``lm_eval/models/hf_steered.py``).

The file is a ``torch.save``'d dict ``{hookpoint: {"steering_vector", "steering_coefficient", "action": "add",
"bias": None, "head_index": None}}`` of plain tensors, floats and None (loadable with ``weights_only=True``).
lm-eval registers a forward hook on ``model.base_model.named_modules()[hookpoint]`` and adds
``steering_vector.to(model dtype) * steering_coefficient`` to its output at every position. We store the whole
float32 vector ``coefficient * norm_j * v_j`` with coefficient 1.0, so lm-eval casts exactly the tensor that
es-lightning's hooks cast: the two agree bit for bit in float32 and in bfloat16.

Hookpoints are the names of the decoder blocks relative to ``base_model``, which differ per architecture:
``layers.N`` (llama, qwen, gemma, mistral, ...), ``h.N`` (gpt2), ``decoder.layers.N`` (opt). They are read
off the model's module tree (built on the meta device, no weights loaded), never guessed.

:func:`split_rows` gives the rows of one data-module split (train, val or test) of a multiple-choice JSONL, for
the local task ``configs/lmeval/es_lightning_mc.yaml``: lm-eval then scores the very questions
``es-lightning test --model.evaluation.folds null`` tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from es_lightning.data.examples import ExampleFormat, questions_from_rows
from es_lightning.data.sources import load_records, rows
from es_lightning.data.splits import SPLITS, group_split
from es_lightning.export.source import ExportSource, TargetModel, check_output
from es_lightning.io import atomic_write_with
from es_lightning.models.layers import get_blocks, hidden_size


def hookpoints(directory: str | Path, layers: list[int], block_path: str | None = None) -> tuple[dict[int, str], int]:
    """lm-eval hookpoint name of each 0-based block in ``layers`` for the model saved in ``directory``, and the
    model's hidden size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = get_blocks(model, block_path)
    bad = [layer for layer in layers if not 0 <= layer < len(blocks)]
    if bad:
        raise ValueError(f"Layers {bad} are out of range for this model's {len(blocks)} blocks (0..{len(blocks) - 1}).")
    names = {id(module): name for name, module in model.base_model.named_modules()}
    missing = [layer for layer in layers if id(blocks[layer]) not in names]
    if missing:
        raise ValueError(
            f"Blocks {missing} are not under model.base_model, where lm-eval's steered model looks for hookpoints."
        )
    return {layer: names[id(blocks[layer])] for layer in layers}, hidden_size(model)


def steer_config(source: ExportSource, names: dict[int, str]) -> dict[str, dict]:
    """The lm-eval steer dict for ``source``: one ``add`` entry per steered block."""
    return {
        names[layer]: {
            "steering_vector": delta.clone(),
            "steering_coefficient": 1.0,
            "action": "add",
            "bias": None,
            "head_index": None,
        }
        for layer, delta in source.deltas().items()
    }


def export_lm_eval(
    source: ExportSource, path: str | Path, target: TargetModel, overwrite: bool = False, block_path: str | None = None
) -> Path:
    """Write the lm-eval steer file (``.pt``) for ``source`` on ``target``; return its path."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"lm-eval reads steer files ending in .pt or .pth (or .csv for SAEs); got {str(path)!r}.")
    check_output(path, overwrite)
    names, width = hookpoints(target.directory, source.bundle.layers, block_path)
    length = next(iter(source.bundle.vectors.values())).shape[0]
    if length != width:
        raise ValueError(f"The bundle's vectors have length {length} but the model's hidden size is {width}.")
    config = steer_config(source, names)
    atomic_write_with(path, lambda tmp: torch.save(config, tmp))
    return path


def split_rows(
    path: str | Path, split: str = "all", val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> list[dict[str, Any]]:
    """The rows of a multiple-choice file (``id``, ``question``, ``choices``, ``answer``) in one split of the data
    module, in file order: ``all``, or ``train``/``val``/``test`` as ``data.splits`` with these fractions and seed
    assigns them (whole questions, by id, shuffled with ``seed``; the defaults are ``data.splits``' defaults)."""
    if split not in ("all", *SPLITS):
        raise ValueError(f"split must be 'all', 'train', 'val' or 'test', got {split!r}.")
    table = rows(load_records(str(path)))
    questions = questions_from_rows(table, ExampleFormat(), str(path))  # the data module's checks and group keys
    if split == "all":
        return table
    return [table[i] for i in group_split([q.group for q in questions], val_fraction, test_fraction, seed)[split]]
