"""The dataset of ``es_lightning_mc.yaml``: a multiple-choice JSONL read by es-lightning, whole or one split."""

from __future__ import annotations

from typing import Any

import datasets

from es_lightning.export.lmeval import split_rows


def load_questions(
    data_files: str | None = None,
    split: str = "all",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    **_: Any,
) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset``: the rows of ``data_files`` in ``split`` as the task's test split.

    Arguments come from ``lm_eval --metadata data_files=PATH split=test`` (lm-eval passes its model_args and the
    task's metadata along too; they are ignored)."""
    if data_files is None:
        raise ValueError(
            "es_lightning_mc needs its questions: pass lm_eval --metadata data_files=PATH.jsonl "
            "(and split=test for the data module's test split)."
        )
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(
                split_rows(data_files, split, float(val_fraction), float(test_fraction), int(seed))
            )
        }
    )
