"""ExpertSteer as one LightningModule: ``fit`` trains the auto-encoders (then callbacks pair layers and compute
vectors), ``test`` runs the cross-validated steering evaluation, ``predict`` generates steered text."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from es_lightning.alignment import AlignmentAutoEncoder
from es_lightning.alignment.autoencoder import CHECKPOINT_KEY
from es_lightning.callbacks.prediction_writer import find_prediction_writer
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.stage import CrossValidatedTest, check_folds, evaluation_folds
from es_lightning.evaluation.report import chosen_coefficients, load_report
from es_lightning.io import sha256_file, sha256_json
from es_lightning.memory import announce, check_model_fits, evaluation_estimate, read_shape
from es_lightning.models.loading import LoadedModel, dtype_name, load_model, resolve_model_dir
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.generation import GenerationSettings, generate, uses_chat_template
from es_lightning.steering.options import check_coefficients, check_methods
from es_lightning.steering.pair_search import PairSearch, PairSearchConfig
from es_lightning.steering.vectors import VectorConfig

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """What ``es-lightning predict`` generates for every prompt: an unsteered row, then each method at its
    coefficients. ``coefficients_from_report`` (default): each method's coefficient is the one ``test`` chose for
    it within the damage budget (median over folds) when a report of this checkpoint exists (``model.report_dir``,
    default ``<run>/report``); otherwise, and for methods the report lacks, every nonzero value of ``coefficients``.
    A method with no coefficient within budget is not generated (the log says so).
    ``bundle_dir``: where ``<method>.safetensors`` bundles are (default: the ones the checkpoint's fit wrote)."""

    methods: list[str] = field(default_factory=lambda: ["expertsteer"])
    coefficients: list[float] = field(default_factory=lambda: [0.1])
    coefficients_from_report: bool = True
    positions: Literal["all", "prompt", "generated"] = "all"
    bundle_dir: str | None = None
    include_unsteered: bool = True

    def validate(self) -> None:
        check_methods(self.methods, "predict.methods")
        check_coefficients(self.coefficients, "predict.coefficients")


class ExpertSteer(AlignmentAutoEncoder):
    """The auto-encoders of :class:`AlignmentAutoEncoder` plus ExpertSteer's evaluation and steered generation.

    ``pairing`` (the layer-pair search) and ``vectors`` (methods, RFM options, seed) serve both the fit's callbacks
    and every evaluation fold. ``test`` needs a checkpoint whose fit ran :class:`LayerPairingCallback`; it loads
    the target model and runs the cross-validated protocol of :mod:`es_lightning.evaluation.protocol`: with
    ``evaluation.protocol: nested`` every fold searches pairs, fits maps and vectors on its own train questions
    and picks coefficients on its val questions, so no fitted piece sees its test questions. Reports go to
    ``report_dir`` (default ``<run folder>/report``). ``predict`` needs the bundles written by
    :class:`SteeringVectorCallback` (or ``predict.bundle_dir``).
    """

    runtime_arguments = AlignmentAutoEncoder.runtime_arguments + ("pairing", "vectors", "evaluation", "generation", "predict", "target_dtype", "report_dir")

    def __init__(
        self,
        objective: Literal["reconstruction", "paired"] = "paired",
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
        self._target: LoadedModel | None = None

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
            self.pairing.check_rows(n_train, n_val, "Layer-pair search during fit (held out: the data module's val split)")
        if stage == "test":
            check_folds(evaluation_folds(datamodule, self.evaluation, self.vectors.seed), datamodule, self.evaluation, self.pairing)

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
            self._prepare_predict()

    # ------------------------------------------------------------------------------ shared pieces
    def setup(self, stage: str) -> None:
        if stage in ("test", "predict"):
            return  # the checkpoint (restored after setup) builds the module; work starts in on_*_start
        super().setup(stage)

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
        datamodule = self.trainer.datamodule
        dtype = self.target_dtype or datamodule.target_spec.dtype
        self._announce_scoring(dtype)
        target = load_model(self.layout.target.name, getattr(datamodule, "cache_dir", None), dtype, device=self.device)
        if target.fingerprint != self.layout.target.fingerprint:
            raise ValueError(
                f"The target model {self.layout.target.name!r} has changed since this checkpoint was fitted "
                f"(fingerprint {target.fingerprint} vs {self.layout.target.fingerprint}). Refit with the current weights."
            )
        return target

    def _announce_scoring(self, dtype: str) -> None:
        """Log and check the memory of scoring (test) or generation (predict) before the target loads. Prompt and
        completion lengths are upper bounds: ``max_length`` tokens, and a choice's characters or ``max_new_tokens``."""
        datamodule, testing = self.trainer.datamodule, self.trainer.state.fn == "test"
        spec = datamodule.target_spec
        completion = (min(spec.max_length, max((len(c) for q in datamodule.all_questions for c in q.choices), default=1))
                      if testing else self.generation.max_new_tokens)
        batch = self.evaluation.batch_size if testing else datamodule.predict_batch_size
        shape = read_shape(resolve_model_dir(self.layout.target.name, getattr(datamodule, "cache_dir", None)), self.layout.target.name)
        generation = self.evaluation.generation
        rows, tokens = (generation.batch_size, generation.max_new_tokens) if testing and generation.enabled else (0, 0)
        announce(evaluation_estimate(shape, dtype_name(dtype, self.device), batch, spec.max_length, completion, self.device,
                                     rows, tokens), self.device)

    def _run_folder(self) -> Path:
        return Path(self.trainer.default_root_dir)

    # ------------------------------------------------------------------------------------- test
    def on_test_start(self) -> None:
        self._require("test")
        self._test = CrossValidatedTest(self.evaluation, self.vectors, self.pairing)

        def load() -> LoadedModel:
            self._target = self._load_target()
            return self._target

        self._test.start(self.trainer, self.layout, self.objective, self.pairing_result, lambda i: self.encoder_linear(i).cpu(), load)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._test.step(batch["question"].tolist())

    def on_test_epoch_end(self) -> None:
        meta = {"target": self.layout.target.name, "expert": self.layout.expert.name, "objective": self.objective,
                "fit_pairs": [list(p) for p in self.pairing_result.pairs], "pairing": asdict(self.pairing),
                "vectors": asdict(self.vectors)}
        dataset = self._test.finish(self.trainer, Path(self.trainer.datamodule.source.path).stem, meta, self._report_folder())
        for entry in dataset.methods:
            accuracy = entry.accuracy_mean if self.evaluation.scoring == "mean" else entry.accuracy_sum
            self.log(f"test/accuracy/{entry.method}", accuracy.mean, rank_zero_only=True)
        if self.trainer.is_global_zero:
            self._record_chosen_coefficients(self._report_folder() / "report.json")
        self._target = self._test = None  # the evaluator holds the target too: drop both before predict loads one

    def _record_chosen_coefficients(self, report: Path) -> None:
        """Write each method's coefficient chosen by this test (median over folds) into its bundle's metadata, so
        the bundle carries the strength it was evaluated at; ``predict`` and the exports read the same report."""
        chosen = chosen_coefficients(load_report(report))
        for method, path in (self.extra.get("bundles") or {}).items():
            if chosen.get(method) and Path(path).exists():
                bundle = SteeringBundle.load(path)
                bundle.extra["chosen_coefficient"] = {"value": chosen[method], "report": str(report.resolve()),
                                                      "protocol": self.evaluation.protocol}
                bundle.save(path)

    def _report_folder(self) -> Path:
        return Path(self.report_dir) if self.report_dir else self._run_folder() / "report"

    # ---------------------------------------------------------------------------------- predict
    def _prepare_predict(self) -> None:
        """Coefficients and resumption, called when the checkpoint is loaded for ``predict``: the first hook that
        knows the checkpoint path, and still before the prompt dataloader is built."""
        self._ckpt_sha256 = sha256_file(self.trainer.ckpt_path)
        self._variants = self._predict_variants()
        self._resume_predictions()

    def _predict_variants(self) -> list[tuple[str, float]]:
        """``(method, coefficient)`` of each row per prompt: unsteered first, then each method (see PredictConfig)."""
        config = self.predict_config
        chosen = self._chosen_coefficients() if config.coefficients_from_report else {}
        variants = [("none", 0.0)] if config.include_unsteered else []
        for method in config.methods:
            if chosen.get(method) == 0:
                log.warning("test found no coefficient of %s within the damage budget (evaluation.budget): it is not "
                            "generated. Pass model.predict.coefficients_from_report false to generate it anyway.", method)
                continue
            values = [chosen[method]] if method in chosen else list(config.coefficients)
            variants += [(method, float(c)) for c in values if c != 0]
        return variants

    def _chosen_coefficients(self) -> dict[str, float]:
        """Each method's coefficient chosen by ``test`` for this checkpoint, or ``{}`` without such a report."""
        path = (Path(self.report_dir) if self.report_dir else self._run_folder() / "report") / "report.json"
        fallback = f"predict uses predict.coefficients {list(self.predict_config.coefficients)}"
        if not path.exists():
            log.info("No evaluation report at %s: %s.", path, fallback)
            return {}
        report = load_report(path)
        if (report.meta.get("checkpoint") or {}).get("sha256") != self._ckpt_sha256:
            log.warning("The evaluation report %s was made from another checkpoint: %s.", path, fallback)
            return {}
        chosen = chosen_coefficients(report)
        log.info("Steering coefficients chosen by test (%s): %s", path, chosen)
        return chosen

    def _resume_predictions(self) -> None:
        """Tell the prediction writer what makes the rows; leave out of the prompts those already written."""
        writer = find_prediction_writer(self.trainer)
        if writer is None:
            return
        datamodule = self.trainer.datamodule
        done = writer.start(self.trainer, sha256_json({  # rows of another configuration are never mixed in
            "ckpt": self._ckpt_sha256,
            "predict": asdict(self.predict_config), "variants": self._variants, "generation": asdict(self.generation),
            "target_dtype": self.target_dtype, "prompts": datamodule.prompts.fingerprint,
        }))
        if done is None:
            log.info("Predictions already complete for this configuration: %s (delete it to regenerate).", writer.output_path)
        elif done:
            log.info("Resuming predictions: %d of %d prompts already written.", len(done), len(datamodule.prompts))
            datamodule.prompts = datamodule.prompts.without(done)
        if done is None or not len(datamodule.prompts):  # nothing to generate: Lightning skips the loop, the
            self._predict_limit = self.trainer.limit_predict_batches  # writer keeps (or merges) the file
            self.trainer.limit_predict_batches = 0
        elif len(datamodule.prompts) < self.trainer.world_size:
            # Lightning's non-padding DDP predict sampler fails with a bare AssertionError on a rank without prompts
            # (found running predict with 1 prompt on 2 processes); every rank sees the same count, so all refuse.
            left = len(datamodule.prompts)
            raise ValueError(
                f"{left} prompt(s) left to generate but {self.trainer.world_size} processes: under DDP every process "
                f"needs at least one prompt. Fix: --trainer.devices {left} (or 1)."
            )

    def on_predict_start(self) -> None:
        self._require("predict")
        config = self.predict_config
        identity = ModelIdentity(self.layout.target.name, self.layout.target.fingerprint, self.layout.target.model_type)
        recorded = self.extra.get("bundles") or {}
        self._bundles: dict[str, SteeringBundle] = {}
        for method in config.methods:
            path = Path(config.bundle_dir) / f"{method}.safetensors" if config.bundle_dir else recorded.get(method)
            if not path or not Path(path).exists():
                raise FileNotFoundError(
                    f"No {method!r} steering bundle found ({path or 'none recorded in the checkpoint'}). Fit with "
                    f"SteeringVectorCallback(methods=[..., {method!r}]) or set model.predict.bundle_dir."
                )
            self._bundles[method] = SteeringBundle.load(path, expected_target=identity)
        self._target = self._load_target()
        chat = uses_chat_template(self.generation, self._target.tokenizer)
        log.info("Generating %s per prompt%s.", ", ".join(m if m == "none" else f"{m} x{c:g}" for m, c in self._variants),
                 " (prompts in the target's chat template)" if chat else "")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        prompts = list(batch["prompt"])
        outputs = [
            generate(self._target.model, self._target.tokenizer, prompts, self.generation, self._bundles.get(method),
                     coefficient if method in self._bundles else 0.0, self.predict_config.positions,
                     block_path=self.trainer.datamodule.target_spec.block_path)
            for method, coefficient in self._variants
        ]
        return [
            {"index": int(index), "id": batch["id"][k], "prompt": prompts[k], "output": outputs[v][k], "method": method,
             "coefficient": coefficient}
            for k, index in enumerate(batch["index"]) for v, (method, coefficient) in enumerate(self._variants)
        ]

    def on_predict_end(self) -> None:
        self._target = None

    def teardown(self, stage: str) -> None:
        if stage == "predict" and getattr(self, "_predict_limit", None) is not None:
            self.trainer.limit_predict_batches, self._predict_limit = self._predict_limit, None
