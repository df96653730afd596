"""The ``predict`` stage of :class:`es_lightning.module.ExpertSteer`: which rows each prompt gets (unsteered, then
each method at the coefficient :func:`~es_lightning.run.coefficients.resolve_coefficients` decides), the bundles,
the prediction writer's resumption, and the steered generation of a batch."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from es_lightning.callbacks.prediction_writer import find_prediction_writer
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.io import sha256_file, sha256_json
from es_lightning.models.loading import LoadedModel
from es_lightning.run.coefficients import report_json, resolve_coefficients
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.generation import GenerationSettings, generate, uses_chat_template
from es_lightning.steering.options import Method, Positions, check_coefficients, check_methods

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """What ``es-lightning predict`` generates for every prompt (``model.predict``): an unsteered row, then each
    method at its coefficient (see :func:`es_lightning.run.coefficients.resolve_coefficients`)."""

    methods: list[Method] = field(default_factory=lambda: ["expertsteer"])
    """Methods generated, each from its bundle."""
    coefficients: list[float] = field(default_factory=lambda: [0.1])
    """Used without a report of this checkpoint, and for methods the report lacks: every nonzero value."""
    coefficients_from_report: bool = True
    """Each method at the coefficient ``test`` chose within the damage budget (median over folds) for this
    checkpoint (``model.report_dir``, default ``<run>/report``); a method with none within budget is skipped."""
    positions: Positions = "all"
    """Where the vector is added: every position, the prompt's only, or the generated tokens' only."""
    bundle_dir: str | None = None
    """Where ``<method>.safetensors`` bundles are; null: the ones the checkpoint's fit wrote."""
    include_unsteered: bool = True
    """Also generate each prompt unsteered (the first row)."""

    def validate(self) -> None:
        check_methods(self.methods, "predict.methods")
        check_coefficients(self.coefficients, "predict.coefficients")


class SteeredPrediction:
    """One ``predict`` run over a checkpoint: :attr:`variants` (the ``(method, coefficient)`` of each row per prompt)
    are settled when it is made, :meth:`resume` skips prompts already written, :meth:`load` reads the bundles and
    the target, :meth:`rows` generates a batch."""

    def __init__(self, config: PredictConfig, generation: GenerationSettings, ckpt_path: str | Path, report_dir: Path):
        self.config, self.generation = config, generation
        self.ckpt_sha256 = sha256_file(ckpt_path)
        self.variants = self._variants(report_dir)
        self.bundles: dict[str, SteeringBundle] = {}
        self.target: LoadedModel | None = None
        self._limit: int | float | None = None  # the trainer's limit_predict_batches while resume() skips the loop

    def _variants(self, report_dir: Path) -> list[tuple[str, float]]:
        """Unsteered first, then each method at its coefficient (see :class:`PredictConfig`)."""
        config = self.config
        chosen = self._chosen(report_dir) if config.coefficients_from_report else {}
        variants = [("none", 0.0)] if config.include_unsteered else []
        for method in config.methods:
            if chosen.get(method) == 0:
                log.warning(
                    "test found no coefficient of %s within the damage budget (evaluation.budget): it is not "
                    "generated. Pass model.predict.coefficients_from_report false to generate it anyway.",
                    method,
                )
                continue
            values = [chosen[method]] if method in chosen else list(config.coefficients)
            variants += [(method, float(c)) for c in values if c != 0]
        return variants

    def _chosen(self, report_dir: Path) -> dict[str, float]:
        """Each method's coefficient chosen by ``test`` for this checkpoint, or ``{}`` without such a report."""
        chosen = resolve_coefficients(report_dir, checkpoint_sha256=self.ckpt_sha256)
        if chosen.report is None:  # a report of another checkpoint is worth a warning; no report is not
            say = log.warning if report_json(report_dir).exists() else log.info
            say("%s: predict uses predict.coefficients %s.", chosen.reason.capitalize(), list(self.config.coefficients))
        else:
            log.info("Steering coefficients chosen by test (%s): %s", chosen.report, chosen.values)
        return chosen.values

    def resume(self, trainer: L.Trainer, datamodule: PairedHiddenStatesDataModule, target_dtype: str | None) -> None:
        """Tell the prediction writer what makes the rows (its key) and leave out of the data module's prompts those
        already written; with nothing left, Lightning's predict loop is skipped (see :meth:`restore`)."""
        writer = find_prediction_writer(trainer)
        if writer is None:
            return
        prompts = datamodule.require_prompts()
        done = writer.start(
            trainer,
            sha256_json(
                {  # rows of another configuration are never mixed in
                    "ckpt": self.ckpt_sha256,
                    "predict": asdict(self.config),
                    "variants": self.variants,
                    "generation": asdict(self.generation),
                    "target_dtype": target_dtype,
                    "prompts": prompts.fingerprint,
                    "target": asdict(datamodule.target_spec),
                    "batch_size": datamodule.predict_batch_size,
                }
            ),
        )
        if done is None:
            log.info(
                "Predictions already complete for this configuration: %s (delete it to regenerate).", writer.output_path
            )
        elif done:
            log.info("Resuming predictions: %d of %d prompts already written.", len(done), len(prompts))
            prompts = datamodule.skip_prompts(done)
        if done is None or not len(prompts):  # nothing to generate: Lightning skips the loop, the writer keeps
            self._limit = trainer.limit_predict_batches  # (or merges) the file
            trainer.limit_predict_batches = 0
        elif len(prompts) < trainer.world_size:
            # Lightning's non-padding DDP predict sampler fails with a bare AssertionError on a rank without prompts
            # (found running predict with 1 prompt on 2 processes); every rank sees the same count, so all refuse.
            raise ValueError(
                f"{len(prompts)} prompt(s) left to generate but {trainer.world_size} processes: under DDP every "
                f"process needs at least one prompt. Fix: --trainer.devices {len(prompts)} (or 1)."
            )

    def restore(self, trainer: L.Trainer) -> None:
        """Undo :meth:`resume`'s skip of the predict loop on the trainer."""
        if self._limit is not None:
            trainer.limit_predict_batches, self._limit = self._limit, None

    def load(self, target: ModelIdentity, recorded: dict[str, str], load_target) -> None:
        """The bundles of :attr:`config`'s methods (checked against ``target``) and the target model."""
        for method in self.config.methods:
            path = (
                Path(self.config.bundle_dir) / f"{method}.safetensors"
                if self.config.bundle_dir
                else recorded.get(method)
            )
            if not path or not Path(path).exists():
                raise FileNotFoundError(
                    f"No {method!r} steering bundle found ({path or 'none recorded in the checkpoint'}). Fit with "
                    f"SteeringVectorCallback(methods=[..., {method!r}]) or set model.predict.bundle_dir."
                )
            self.bundles[method] = SteeringBundle.load(path, expected_target=target)
        self.target = load_target()
        chat = uses_chat_template(self.generation, self.target.tokenizer)
        log.info(
            "Generating %s per prompt%s.",
            ", ".join(m if m == "none" else f"{m} x{c:g}" for m, c in self.variants),
            " (prompts in the target's chat template)" if chat else "",
        )

    def rows(self, batch: dict[str, Any], block_path: str | None) -> list[dict[str, Any]]:
        """Every variant's generation for every prompt of ``batch``: one row each, prompt-major."""
        if self.target is None:
            raise RuntimeError("SteeredPrediction.load must run before rows.")
        prompts = list(batch["prompt"])
        outputs = [
            generate(
                self.target.model,
                self.target.tokenizer,
                prompts,
                self.generation,
                self.bundles.get(method),
                coefficient if method in self.bundles else 0.0,
                self.config.positions,
                block_path=block_path,
            )
            for method, coefficient in self.variants
        ]
        return [
            {
                "index": int(index),
                "id": batch["id"][k],
                "prompt": prompts[k],
                "output": outputs[v][k],
                "method": method,
                "coefficient": coefficient,
            }
            for k, index in enumerate(batch["index"])
            for v, (method, coefficient) in enumerate(self.variants)
        ]
