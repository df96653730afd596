"""ExpertSteer as one LightningModule: ``fit`` trains the auto-encoders it holds (then callbacks pair layers and
compute vectors), ``test`` runs the cross-validated steering evaluation, ``predict`` generates steered text."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from es_lightning.alignment.fitting import build_and_seed, choose_layer_map, training_logs, validation_logs
from es_lightning.alignment.maps import AlignmentMaps, Objective
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.stage import CrossValidatedTest
from es_lightning.io import sha256_file
from es_lightning.memory import announce, evaluation_estimate, read_shape
from es_lightning.models.loading import LoadedModel, dtype_name, load_model, resolve_model_dir
from es_lightning.prediction import PredictConfig, SteeredPrediction
from es_lightning.preflight import check_settings
from es_lightning.run.record import FitRecord, RunRecord
from es_lightning.steering.bundle import ModelIdentity
from es_lightning.steering.generation import GenerationSettings
from es_lightning.steering.pair_search import PairSearch, PairSearchConfig
from es_lightning.steering.vectors import VectorConfig

log = logging.getLogger(__name__)


class ExpertSteer(L.LightningModule):
    """ExpertSteer's four steps as one LightningModule: it holds the auto-encoders (:attr:`alignment`, an
    :class:`~es_lightning.alignment.maps.AlignmentMaps`) and what the fit recorded (:attr:`record`, a
    :class:`~es_lightning.run.record.RunRecord`, written into every checkpoint).

    ``fit`` trains the auto-encoders (:mod:`es_lightning.alignment.fitting`): for ``layer_map`` when declared, else
    for the pairs the layer-pair search chose (``pairing``; its callback runs before the maps are built), else for
    every captured expert layer at the target's relative depth; ``ridge`` is the closed-form seed's (null: the
    search's, else 0.01). ``pairing`` and ``vectors`` serve both the fit's callbacks (steps 2 and 3, results handed
    over through :meth:`record_pairing` and :meth:`record_bundles`) and every evaluation fold. ``test`` runs the
    nested cross-validated protocol (:mod:`es_lightning.evaluation.stage`: no fitted piece sees a fold's test
    questions) and writes its report to ``report_dir`` (default ``<run folder>/report``); ``predict`` generates with
    the fit's bundles (:mod:`es_lightning.prediction`).

    Long because: Lightning drives fit, test and predict through one module, so its hooks for all three live here;
    each stage's work is delegated (``alignment/``, ``evaluation/stage.py``, ``prediction.py``, the callbacks).
    """

    # Init arguments that are settings of a run, not of the fitted model: kept out of the checkpoint's
    # hyperparameters so that LightningCLI does not restore them over the command line on --ckpt_path.
    runtime_arguments: tuple[str, ...] = (
        "optimizer",
        "scheduler",
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
        super().__init__()
        self.alignment = AlignmentMaps(objective, pair_weight)
        pairing.validate()
        vectors.validate()
        evaluation.validate()
        predict.validate()
        self.save_hyperparameters(ignore=list(self.runtime_arguments))
        self.declared_layer_map = layer_map
        self.closed_form_init = closed_form_init
        self.ridge = ridge
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.pairing = pairing
        self.vectors = vectors
        self.evaluation = evaluation
        self.generation = generation
        self.predict_config = predict
        self.target_dtype = target_dtype
        self.report_dir = report_dir
        self.record = RunRecord(objective)

    # ---------------------------------------------------------------------------------- checks
    def prepare_data(self) -> None:
        """Settings checked before any model weights are loaded (:func:`es_lightning.preflight.check_settings`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, PairedHiddenStatesDataModule) and self.trainer.state.fn in ("fit", "test"):
            check_settings(
                self.trainer,
                datamodule,
                searches_pairs=self.objective == "paired" and self.declared_layer_map is None,
                target_dtype=self.target_dtype,
                pairing=self.pairing,
                evaluation=self.evaluation,
                vectors_seed=self.vectors.seed,
            )

    # ------------------------------------------------------------------------- step results
    def record_pairing(self, result: PairSearch) -> None:
        """Step 2's result: the intervention pairs. Given before the fit builds the auto-encoders (the paired
        objective's search), they are then trained only for these pairs, seeded with its ridge."""
        self.record = self.record.with_pairing(result)

    def record_bundles(self, paths: dict[str, str]) -> None:
        """Step 3's result: each method's bundle file (``predict`` loads them)."""
        self.record = self.record.with_bundles(paths)

    def record_fit(self, fit: FitRecord) -> None:
        """The options and key of the fit under way (:class:`~es_lightning.run.record.FitRecorder`)."""
        self.record = self.record.with_fit(fit)

    @property
    def objective(self) -> Objective:
        """The auto-encoders' objective (``paired`` or ``reconstruction``), held by :attr:`alignment`."""
        return self.alignment.objective

    @property
    def pairing_result(self) -> PairSearch | None:
        """Step 2's pairs, once recorded."""
        return self.record.pairing

    @property
    def cache_keys(self) -> dict[str, str]:
        """The keys of the paired caches the auto-encoders were fitted on."""
        return dict(self.record.cache_keys)

    @property
    def batch_layers(self) -> tuple[list[int], list[int]] | None:
        """The layers a training batch needs (see :attr:`AlignmentMaps.batch_layers`); the data module reads it."""
        return self.alignment.batch_layers

    # ---------------------------------------------------------------------------------------- fit
    def setup(self, stage: str) -> None:
        if stage in ("test", "predict"):
            return  # the checkpoint (restored after setup) builds the maps; work starts in on_*_start
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, PairedHiddenStatesDataModule) or datamodule.layout is None:
            if not self.alignment.is_built:
                raise RuntimeError("ExpertSteer needs a PairedHiddenStatesDataModule: pass one to the Trainer.")
            return
        if not self.alignment.is_built and stage != "fit":
            return  # the checkpoint, restored after setup, builds the maps with its own trained layers
        if self.alignment.is_built:
            self.alignment.build(datamodule.layout, self.alignment.layer_map)  # validates the layout
        else:
            pairing = self.record.pairing
            ridge = self.ridge if self.ridge is not None else (pairing.ridge if pairing is not None else None)
            planned = dict(pairing.pairs) if pairing is not None else None
            layer_map = choose_layer_map(datamodule.layout, self.declared_layer_map, planned)
            build_and_seed(
                self.alignment, datamodule, layer_map, ridge, self.closed_form_init, self.trainer.strategy.root_device
            )
        self.record = self.record.built(datamodule.layout, self.alignment.layer_map, datamodule.cache_keys)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.alignment.losses(batch)
        for name, value in training_logs(losses).items():
            self.log(name, value, prog_bar=name == "train/loss", batch_size=batch["expert"].shape[0])
        return losses["total"]

    def on_validation_start(self) -> None:
        if not self.alignment.is_built:
            raise ValueError("`validate` needs fitted auto-encoders: pass --ckpt_path checkpoints/<run>/last.ckpt.")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.alignment.metrics.update(self.alignment.losses(batch), rows=batch["expert"].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss, logs = validation_logs(self.alignment)
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        for name, value in logs.items():
            self.log(name, value, prog_bar="/layer" not in name and name != "val/mse")

    def configure_optimizers(self):
        optimizer = (self.optimizer_factory or (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0)))(
            self.parameters()
        )
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"},
        }

    # ------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.record.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = RunRecord.load(checkpoint)
        layout = record.layout
        assert layout is not None  # RunRecord.load refuses a checkpoint without one
        built = self.alignment.layout
        if built is not None and built != layout:
            raise ValueError(
                f"The checkpoint was trained for {layout.describe()}, but this run's cache holds {built.describe()}. "
                "Fix: resume with the checkpoint's config and models, or drop --ckpt_path."
            )
        self.alignment.build(layout, record.layer_map)
        self.record = record
        state = checkpoint.get("state_dict") or {}  # written while the module inherited the maps: keys had no prefix
        for name in [n for n in state if not n.startswith("alignment.")]:
            state[f"alignment.{name}"] = state.pop(name)
        if self._trainer is not None and self.trainer.state.fn == "predict":
            # the first hook that knows the checkpoint path, and still before the prompt dataloader is built
            self._predict = SteeredPrediction(
                self.predict_config, self.generation, str(self.trainer.ckpt_path), self._report_folder()
            )
            self._predict.resume(self.trainer, self._datamodule(), self.target_dtype)

    # ------------------------------------------------------------------------------ shared pieces
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
        if not self.alignment.is_built:
            raise ValueError(f"`{what}` needs a fitted checkpoint: pass --ckpt_path checkpoints/<run>/last.ckpt.")
        if self.pairing_result is None or not self.pairing_result.pairs:
            raise ValueError(
                f"The checkpoint has no layer pairs or vectors, so `{what}` cannot steer. Fit with "
                "LayerPairingCallback and SteeringVectorCallback in trainer.callbacks (see configs/default.yaml)."
            )
        return self.pairing_result

    def _load_target(self) -> LoadedModel:
        datamodule, fitted = self._datamodule(), self.alignment.built_layout.target
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
            min(
                spec.max_length,
                max((len(c) for q in datamodule.question_table.all_questions for c in q.choices), default=1),
            )
            if testing
            else self.generation.max_new_tokens
        )
        batch = self.evaluation.batch_size if testing else datamodule.predict_batch_size
        name = self.alignment.built_layout.target.name
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
            self.alignment.built_layout,
            self.objective,
            pairing,
            lambda i: self.alignment.encoder_linear(i).cpu(),
            self._load_target,
        )

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        assert self._test is not None  # on_test_start made it
        self._test.step(batch["question"].tolist())

    def on_test_epoch_end(self) -> None:
        layout, pairing = self.alignment.built_layout, self._require("test")
        assert self._test is not None  # on_test_start made it
        meta = {
            "target": layout.target.name,
            "expert": layout.expert.name,
            "objective": self.objective,
            "fit_pairs": [list(p) for p in pairing.pairs],
            "pairing": asdict(self.pairing),
            "vectors": asdict(self.vectors),
            "bundles": {m: sha256_file(p) for m, p in self.record.bundles.items() if Path(p).exists()},
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
        layout = self.alignment.built_layout
        identity = ModelIdentity(layout.target.name, layout.target.fingerprint, layout.target.model_type)
        self._predict.load(identity, self.record.bundles, self._load_target)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        return self._predict.rows(batch, self._datamodule().target_spec.block_path)

    def on_predict_end(self) -> None:
        self._predict.target = None

    def teardown(self, stage: str) -> None:
        if stage == "predict" and getattr(self, "_predict", None) is not None:
            self._predict.restore(self.trainer)
