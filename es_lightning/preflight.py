"""Settings checked against the data and the models' configs before any model weights are loaded, so that a run
that cannot finish stops in seconds with the fix instead of after minutes of work."""

from __future__ import annotations

import lightning as L

from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.stage import check_folds, evaluation_folds
from es_lightning.memory import check_model_fits
from es_lightning.steering.pair_search import PairSearchConfig


def check_settings(
    trainer: L.Trainer,
    datamodule: PairedHiddenStatesDataModule,
    *,
    searches_pairs: bool,
    target_dtype: str | None,
    pairing: PairSearchConfig,
    evaluation: EvaluationConfig,
    vectors_seed: int,
) -> None:
    """For the trainer's ``fit`` or ``test``: each model's weights in its dtype against the free memory of the
    trainer's device (``test`` loads only the target, in ``target_dtype`` when set); when the layer pairs are searched
    (``searches_pairs``), ``pairing.top_k`` against the captured layers and enough held-out rows for the search (the
    val split during ``fit``); in ``test``, every fold of the nested protocol."""
    stage = trainer.state.fn
    layout = datamodule.prepare_layout()
    device = trainer.strategy.root_device  # each model is checked alone: they are loaded one at a time
    for side in ("target",) if stage == "test" else ("expert", "target"):
        own = side == "target" and stage == "test"
        dtype = (own and target_dtype) or getattr(datamodule, f"{side}_spec").dtype
        option = "model.target_dtype" if own else f"data.{side}.dtype"
        check_model_fits(getattr(layout, side).directory, getattr(layout, side).name, dtype, device, option)
    if searches_pairs:
        pairing.pairing_rule.check_fits(len(layout.expert_layers), len(layout.target_layers))
    if stage == "fit" and searches_pairs:
        splits = datamodule.question_table.split_indices
        n_train, n_val = len(splits["train"]), len(splits["val"])
        pairing.check_rows(n_train, n_val, "Layer-pair search during fit (held out: the data module's val split)")
    if stage == "test":
        table = datamodule.question_table
        check_folds(evaluation_folds(table, evaluation, vectors_seed), table, evaluation, pairing)
