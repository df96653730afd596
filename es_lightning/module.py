"""ExpertSteer as one LightningModule: ``fit`` trains the auto-encoders (then callbacks pair layers and compute
vectors), ``test`` runs the cross-validated steering evaluation, ``predict`` generates steered text."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from es_lightning.alignment import AlignmentAutoEncoder
from es_lightning.alignment.autoencoder import CHECKPOINT_KEY, Objective
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.stage import CrossValidatedTest, check_folds, evaluation_folds
from es_lightning.io import sha256_file
from es_lightning.memory import announce, check_model_fits, evaluation_estimate, read_shape
from es_lightning.models.loading import LoadedModel, dtype_name, load_model, resolve_model_dir
from es_lightning.prediction import PredictConfig, SteeredPrediction
from es_lightning.steering.bundle import ModelIdentity
from es_lightning.steering.generation import GenerationSettings
from es_lightning.steering.pair_search import PairSearch, PairSearchConfig
from es_lightning.steering.vectors import VectorConfig

log = logging.getLogger(__name__)


class ExpertSteer(AlignmentAutoEncoder):
    """The auto-encoders of :class:`AlignmentAutoEncoder` plus ExpertSteer's evaluation and steered generation.

    ``pairing`` and ``vectors`` serve both the fit's callbacks (steps 2 and 3, results handed over through
    :meth:`record_pairing` and :meth:`record_bundles`) and every evaluation fold. ``test`` runs the nested
    cross-validated protocol (:mod:`es_lightning.evaluation.stage`: no fitted piece sees a fold's test questions)
    and writes its report to ``report_dir`` (default ``<run folder>/report``); ``predict`` generates with the
    fit's bundles (:mod:`es_lightning.prediction`).

    Long because: Lightning drives fit, test and predict through one module, so its hooks for all three live here;
    each stage's work is delegated (``evaluation/stage.py``, ``prediction.py``, the callbacks).
    """

    runtime_arguments = AlignmentAutoEncoder.runtime_arguments + (
        "pairing",
        "vectors",
        "evaluation",
        "generation",
        "predict",
        "target_dtype",
        "report_dir",
    )

    def __init__(
        self,
        objective: Objective = "paired",
        pair_weight: float = 1.0,
        layer_map: dict[int, int] | None = None,
        closed_form_init: bool = True,
        ridge: float | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        pairing: PairSearchConfig = PairSearchConfig(),
        vectors: VectorConfig = VectorConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        generation: GenerationSettings = GenerationSettings(),
        predict: PredictConfig = PredictConfig(),
        target_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
        report_dir: str | None = None,
    ):
        super().__init__(objective, pair_weight, layer_map, closed_form_init, ridge, optimizer, scheduler)
        pairing.validate()
        vectors.validate()
        evaluation.validate()
        self.pairing = pairing
        self.vectors = vectors
        self.pairing_result: PairSearch | None = None  # set by LayerPairingCallback; saved in the checkpoint
        predict.validate()
        self.evaluation = evaluation
        self.generation = generation
        self.predict_config = predict
        self.target_dtype = target_dtype
        self.report_dir = report_dir

    # ---------------------------------------------------------------------------------- checks
    def prepare_data(self) -> None:
        """Settings checked against the data and the models' configs before any model weights are loaded: each
        model's weights in its dtype against the free memory of the trainer's device, the pairing's ``top_k``
        against the captured layers, and enough held-out rows for the pair search (the val
        split during ``fit``; each fold's train questions in a nested ``test``)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "prepare_layout"):
            return
        stage = self.trainer.state.fn
        if stage not in ("fit", "test"):
            return
        layout = datamodule.prepare_layout()
        device = self.trainer.strategy.root_device  # each model is checked alone: they are loaded one at a time
        for side in ("target",) if stage == "test" else ("expert", "target"):
            own = side == "target" and stage == "test"  # test loads the target in model.target_dtype when set
            dtype = (own and self.target_dtype) or getattr(datamodule, f"{side}_spec").dtype
            option = "model.target_dtype" if own else f"data.{side}.dtype"
            check_model_fits(getattr(layout, side).directory, getattr(layout, side).name, dtype, device, option)
        if self.objective == "paired" and self.declared_layer_map is None:
            self.pairing.pairing_rule.check_fits(len(layout.expert_layers), len(layout.target_layers))
        if stage == "fit" and self.objective == "paired" and self.declared_layer_map is None:
            n_train, n_val = len(datamodule.split_indices["train"]), len(datamodule.split_indices["val"])
            self.pairing.check_rows(
                n_train, n_val, "Layer-pair search during fit (held out: the data module's val split)"
            )
        if stage == "test":
            check_folds(
                evaluation_folds(datamodule, self.evaluation, self.vectors.seed),
                datamodule,
                self.evaluation,
                self.pairing,
            )

    # ------------------------------------------------------------------------- step results
    def record_pairing(self, result: PairSearch) -> None:
        """Step 2's result: the intervention pairs (saved in the checkpoint). Before ``setup`` (the paired
        objective's search), the auto-encoders are then trained only for these pairs, seeded with its ridge."""
        self.pairing_result = result
        if not self.is_built:
            self.plan_layers(dict(result.pairs), result.ridge)

    def record_bundles(self, paths: dict[str, str]) -> None:
        """Step 3's result: each method's bundle file (saved in the checkpoint; ``predict`` loads them)."""
        self.extra["bundles"] = dict(paths)

    @property
    def bundle_paths(self) -> dict[str, str]:
        """Each method's bundle file written by the fit (empty before step 3)."""
        return dict(self.extra.get("bundles") or {})

    # ------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.pairing_result is not None:
            checkpoint[CHECKPOINT_KEY]["pairing"] = self.pairing_result.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = self.extra.pop("pairing", None)
        self.pairing_result = PairSearch.from_dict(saved) if saved else None
        if self._trainer is not None and self.trainer.state.fn == "predict":
            # the first hook that knows the checkpoint path, and still before the prompt dataloader is built
            self._predict = SteeredPrediction(
                self.predict_config, self.generation, str(self.trainer.ckpt_path), self._report_folder()
            )
            self._predict.resume(self.trainer, self._datamodule(), self.target_dtype)

    # ------------------------------------------------------------------------------ shared pieces
    def setup(self, stage: str) -> None:
        if stage in ("test", "predict"):
            return  # the checkpoint (restored after setup) builds the module; work starts in on_*_start
        super().setup(stage)

    def _datamodule(self) -> PairedHiddenStatesDataModule:
        """The trainer's paired data module (the CLI sets it; any other is refused with the fix)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, PairedHiddenStatesDataModule):
            raise TypeError(
                "ExpertSteer needs es_lightning.data.PairedHiddenStatesDataModule as the data module "
                "(the es-lightning CLI sets it)."
            )
        return datamodule

    def _require(self, what: str) -> PairSearch:
        if not self.is_built:
            raise ValueError(f"`{what}` needs a fitted checkpoint: pass --ckpt_path checkpoints/<run>/last.ckpt.")
        if self.pairing_result is None or not self.pairing_result.pairs:
            raise ValueError(
                f"The checkpoint has no layer pairs or vectors, so `{what}` cannot steer. Fit with "
                "LayerPairingCallback and SteeringVectorCallback in trainer.callbacks (see configs/default.yaml)."
            )
        return self.pairing_result

    def _load_target(self) -> LoadedModel:
        datamodule, fitted = self._datamodule(), self.built_layout.target
        dtype = self.target_dtype or datamodule.target_spec.dtype
        self._announce_scoring(dtype)
        target = load_model(fitted.name, datamodule.cache_dir, dtype, device=self.device)
        if target.fingerprint != fitted.fingerprint:
            raise ValueError(
                f"The target model {fitted.name!r} has changed since this checkpoint was fitted "
                f"(fingerprint {target.fingerprint} vs {fitted.fingerprint}). Refit with the current weights."
            )
        return target

    def _announce_scoring(self, dtype: str) -> None:
        """Log and check the memory of scoring (test) or generation (predict) before the target loads. Prompt and
        completion lengths are upper bounds: ``max_length`` tokens, and a choice's characters or ``max_new_tokens``."""
        datamodule, testing = self._datamodule(), self.trainer.state.fn == "test"
        spec = datamodule.target_spec
        completion = (
            min(spec.max_length, max((len(c) for q in datamodule.all_questions for c in q.choices), default=1))
            if testing
            else self.generation.max_new_tokens
        )
        batch = self.evaluation.batch_size if testing else datamodule.predict_batch_size
        name = self.built_layout.target.name
        shape = read_shape(resolve_model_dir(name, datamodule.cache_dir), name)
        generation = self.evaluation.generation
        rows, tokens = (generation.batch_size, generation.max_new_tokens) if testing and generation.enabled else (0, 0)
        announce(
            evaluation_estimate(
                shape, dtype_name(dtype, self.device), batch, spec.max_length, completion, self.device, rows, tokens
            ),
            self.device,
        )

    # ------------------------------------------------------------------------------------- test
    def on_test_start(self) -> None:
        pairing = self._require("test")
        self._test: CrossValidatedTest | None = CrossValidatedTest(self.evaluation, self.vectors, self.pairing)
        self._test.start(
            self.trainer,
            self.built_layout,
            self.objective,
            pairing,
            lambda i: self.encoder_linear(i).cpu(),
            self._load_target,
        )

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        assert self._test is not None  # on_test_start made it
        self._test.step(batch["question"].tolist())

    def on_test_epoch_end(self) -> None:
        layout, pairing = self.built_layout, self._require("test")
        assert self._test is not None  # on_test_start made it
        meta = {
            "target": layout.target.name,
            "expert": layout.expert.name,
            "objective": self.objective,
            "fit_pairs": [list(p) for p in pairing.pairs],
            "pairing": asdict(self.pairing),
            "vectors": asdict(self.vectors),
            "bundles": {m: sha256_file(p) for m, p in self.bundle_paths.items() if Path(p).exists()},
        }
        dataset = self._test.finish(
            self.trainer, Path(self._datamodule().source.path).stem, meta, self._report_folder()
        )
        for entry in dataset.methods:
            accuracy = entry.accuracy_mean if self.evaluation.scoring == "mean" else entry.accuracy_sum
            self.log(f"test/accuracy/{entry.method}", accuracy.mean, rank_zero_only=True)
        self._test = None  # the evaluator holds the target: drop it before predict loads one

    def _report_folder(self) -> Path:
        return Path(self.report_dir) if self.report_dir else Path(self.trainer.default_root_dir) / "report"

    # ---------------------------------------------------------------------------------- predict
    def on_predict_start(self) -> None:
        self._require("predict")
        layout = self.built_layout
        identity = ModelIdentity(layout.target.name, layout.target.fingerprint, layout.target.model_type)
        self._predict.load(identity, self.bundle_paths, self._load_target)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self._predict.rows(batch, self._datamodule().target_spec.block_path)

    def on_predict_end(self) -> None:
        self._predict.target = None

    def teardown(self, stage: str) -> None:
        if stage == "predict" and getattr(self, "_predict", None) is not None:
            self._predict.restore(self.trainer)
