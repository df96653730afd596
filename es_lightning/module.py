"""ExpertSteer as one LightningModule: ``fit`` trains the auto-encoders (then callbacks pair layers and compute
vectors), ``test`` runs the cross-validated steering evaluation, ``predict`` generates steered text."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from es_lightning.alignment import AlignmentAutoEncoder
from es_lightning.callbacks.common import on_rank_zero
from es_lightning.callbacks.prediction_writer import find_prediction_writer
from es_lightning.data.folds import Fold
from es_lightning.evaluation.plots import plot_coefficient_sweep
from es_lightning.evaluation.protocol import EvaluationConfig, Evaluator, FoldPlan, assemble_report, plan_folds, render_questions
from es_lightning.evaluation.report import Report, write_report
from es_lightning.io import sha256_file, sha256_json
from es_lightning.models.loading import LoadedModel, load_model
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.generation import GenerationSettings, generate
from es_lightning.steering.vectors import METHODS

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """What ``es-lightning predict`` generates for every prompt: an unsteered row, then each method at each
    nonzero coefficient. ``bundle_dir``: where ``<method>.safetensors`` bundles are (default: the ones the
    checkpoint's fit wrote)."""

    methods: list[str] = field(default_factory=lambda: ["expertsteer"])
    coefficients: list[float] = field(default_factory=lambda: [0.1])
    positions: Literal["all", "prompt", "generated"] = "all"
    bundle_dir: str | None = None
    include_unsteered: bool = True

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown predict methods {unknown}: use some of {list(METHODS)}.")
        if not self.coefficients:
            raise ValueError("predict.coefficients is empty: give at least one coefficient, e.g. [0.1].")
        bad = [c for c in self.coefficients if not isinstance(c, (int, float)) or c != c or abs(c) == float("inf")]
        if bad:
            raise ValueError(f"predict.coefficients must be finite numbers, got {bad}.")


def _gather(obj: Any) -> list[Any]:
    """``obj`` from every rank (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ExpertSteer(AlignmentAutoEncoder):
    """The auto-encoders of :class:`AlignmentAutoEncoder` plus ExpertSteer's evaluation and steered generation.

    ``test`` needs a checkpoint whose fit ran :class:`LayerPairingCallback` (pairs); it loads the target model,
    and for each fold computes vectors from the fold's train questions, picks coefficients on its val
    questions and scores its test questions (see :mod:`es_lightning.evaluation.protocol`). Reports go to
    ``report_dir`` (default ``<run folder>/report``). ``predict`` needs the bundles written by
    :class:`SteeringVectorCallback` (or ``predict.bundle_dir``).
    """

    runtime_arguments = AlignmentAutoEncoder.runtime_arguments + ("evaluation", "generation", "predict", "target_dtype", "report_dir")

    def __init__(
        self,
        objective: Literal["reconstruction", "paired"] = "paired",
        pair_weight: float = 1.0,
        layer_map: dict[int, int] | None = None,
        closed_form_init: bool = True,
        ridge: float = 1e-2,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        evaluation: EvaluationConfig = EvaluationConfig(),
        generation: GenerationSettings = GenerationSettings(),
        predict: PredictConfig = PredictConfig(),
        target_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        report_dir: str | None = None,
    ):
        super().__init__(objective, pair_weight, layer_map, closed_form_init, ridge, optimizer, scheduler)
        evaluation.validate()
        predict.validate()
        self.evaluation = evaluation
        self.generation = generation
        self.predict_config = predict
        self.target_dtype = target_dtype
        self.report_dir = report_dir
        self._target: LoadedModel | None = None

    # ------------------------------------------------------------------------------ shared pieces
    def setup(self, stage: str) -> None:
        if stage == "predict":
            writer = find_prediction_writer(self.trainer)
            if writer is not None:  # rows of another configuration must never be mixed into a resumed run
                ckpt = Path(self.trainer.ckpt_path) if self.trainer.ckpt_path else None
                source = getattr(self.trainer.datamodule, "predict_source", None)
                writer.run_fingerprint = sha256_json({
                    "ckpt": [str(ckpt), ckpt.stat().st_size, ckpt.stat().st_mtime_ns] if ckpt and ckpt.exists() else None,
                    "predict": asdict(self.predict_config), "generation": asdict(self.generation),
                    "target_dtype": self.target_dtype, "prompts": asdict(source) if source else None,
                })
        if stage in ("test", "predict"):
            return  # the checkpoint (restored after setup) builds the module; work starts in on_*_start
        super().setup(stage)

    def _require(self, what: str) -> dict:
        if not self.is_built:
            raise ValueError(f"`{what}` needs a fitted checkpoint: pass --ckpt_path checkpoints/<run>/last.ckpt.")
        pairing = self.extra.get("pairing")
        if not pairing or not pairing.get("pairs"):
            raise ValueError(
                f"The checkpoint has no layer pairs or vectors, so `{what}` cannot steer. Fit with "
                "LayerPairingCallback and SteeringVectorCallback in trainer.callbacks (see configs/default.yaml)."
            )
        return pairing

    def _load_target(self) -> LoadedModel:
        datamodule = self.trainer.datamodule
        dtype = self.target_dtype or datamodule.target_spec.dtype
        target = load_model(self.layout.target.name, getattr(datamodule, "cache_dir", None), dtype, device=self.device)
        if target.fingerprint != self.layout.target.fingerprint:
            raise ValueError(
                f"The target model {self.layout.target.name!r} has changed since this checkpoint was fitted "
                f"(fingerprint {target.fingerprint} vs {self.layout.target.fingerprint}). Refit with the current weights."
            )
        return target

    def _run_folder(self) -> Path:
        return Path(self.trainer.default_root_dir)

    # ------------------------------------------------------------------------------------- test
    def on_test_start(self) -> None:
        pairing = self._require("test")
        datamodule = self.trainer.datamodule
        self._target = self._load_target()
        config = self.evaluation
        questions = datamodule.all_questions
        fmt = datamodule.source.format
        if fmt.kind != "multiple_choice":
            raise ValueError("`test` scores multiple-choice questions; this data source is not in the multiple_choice format.")
        rendered = render_questions(self._target.tokenizer, questions, fmt.completion_template, datamodule.target_spec.chat_template)
        subset = list(range(len(questions)))
        if config.max_questions and config.max_questions < len(subset):
            subset = sorted(random.Random(config.seed).sample(subset, config.max_questions))
        local_split = None
        if config.folds is None:
            position = {q: k for k, q in enumerate(subset)}
            local_split = {name: [position[q] for q in idx if q in position] for name, idx in datamodule.question_split.items()}
        local_folds = plan_folds(len(subset), [questions[q].group for q in subset], config, local_split)
        folds = [Fold(f.index, *(tuple(subset[k] for k in part) for part in (f.train, f.val, f.test))) for f in local_folds]
        for fold in folds:
            empty = [name for name, part in (("train", fold.train), ("val", fold.val), ("test", fold.test)) if not part]
            if empty:
                raise ValueError(
                    f"Evaluation fold {fold.index} has no {' and no '.join(empty)} questions. Use more questions, fewer "
                    f"folds, or (with folds: null) non-zero val/test fractions in data.splits."
                )
        target_spec = datamodule.target_spec
        self._evaluator = Evaluator(
            self._target.model, self._target.tokenizer, rendered, datamodule.tensors, datamodule.question_rows,
            self.layout.expert_layers, self.layout.target_layers, [tuple(p) for p in pairing["pairs"]],
            lambda i: self.encoder_linear(i).cpu(), config, progress=self.trainer.is_global_zero,
            add_special_tokens=not target_spec.chat_template, block_path=target_spec.block_path,
        )

        def plan_all() -> list[FoldPlan]:
            plans = []
            for fold in folds:
                log.warning("Fold %d/%d: vectors from %d train questions, coefficients on %d val questions",
                            fold.index + 1, len(folds), len(fold.train), len(fold.val))
                plans.append(self._evaluator.plan(fold))
                log.warning("Fold %d chosen coefficients: %s", fold.index + 1, plans[-1].chosen)
            return plans

        self._plans: list[FoldPlan] = on_rank_zero(self.trainer, plan_all)
        self._fold_of = {q: plan.fold.index for plan in self._plans for q in plan.fold.test}
        self._test_results: list[tuple[int, int, dict]] = []  # (fold, question, {variant: {"mean","sum"}})

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        by_fold: dict[int, list[int]] = {}
        for q in batch["question"].tolist():
            if q in self._fold_of:
                by_fold.setdefault(self._fold_of[q], []).append(q)
        for fold, qs in by_fold.items():
            scored = self._evaluator.score_test(self._plans[fold], qs)
            for k, q in enumerate(qs):
                self._test_results.append((fold, q, {variant: {s: bool(v[s][k]) for s in v} for variant, v in scored.items()}))

    def on_test_epoch_end(self) -> None:
        merged: dict[tuple[int, int], dict] = {}
        for part in _gather(self._test_results):
            for fold, q, values in part:
                merged[(fold, q)] = values  # de-duplicates the sampler's padding
        results: dict[int, dict] = {}
        tested: dict[int, list[int]] = {}
        for (fold, q) in sorted(merged):
            tested.setdefault(fold, []).append(q)
            for variant, values in merged[(fold, q)].items():
                slot = results.setdefault(fold, {}).setdefault(variant, {"mean": [], "sum": []})
                for s in ("mean", "sum"):
                    slot[s].append(values[s])
        results = {f: {v: {s: torch.tensor(x) for s, x in d.items()} for v, d in r.items()} for f, r in results.items()}
        datamodule = self.trainer.datamodule
        name = Path(datamodule.source.path).stem
        dataset = assemble_report(name, self._plans, results, tested, self.evaluation)
        for entry in dataset.methods:
            self.log(f"test/accuracy/{entry.method}", entry.accuracy_mean.mean if self.evaluation.scoring == "mean" else entry.accuracy_sum.mean, rank_zero_only=True)
        if self.trainer.is_global_zero:
            report = Report(
                model=self.layout.target.name, scoring=self.evaluation.scoring, alpha=self.evaluation.alpha,
                k=len(self._plans), fold_mode=self.evaluation.fold_mode if self.evaluation.folds else "split",
                datasets=(dataset,),
                meta={"checkpoint": {"path": str(self.trainer.ckpt_path), "sha256": sha256_file(self.trainer.ckpt_path)} if self.trainer.ckpt_path else None,
                      "expert": self.layout.expert.name, "pairs": self.extra["pairing"]["pairs"], "objective": self.objective,
                      "coefficients": list(self.evaluation.coefficients), "positions": self.evaluation.positions,
                      "fold_plans": [{"fold": p.fold.index, "chosen": p.chosen, "n_train": len(p.fold.train),
                                      "n_val": len(p.fold.val), "n_test": len(p.fold.test), **p.diagnostics} for p in self._plans]},
            )
            folder = Path(self.report_dir) if self.report_dir else self._run_folder() / "report"
            json_path, md_path = write_report(report, folder)
            plot_coefficient_sweep(report, folder / "coefficient_sweep.png")
            log.warning("Evaluation report: %s, %s, %s", json_path, md_path, folder / "coefficient_sweep.png")
        self._target = None

    # ---------------------------------------------------------------------------------- predict
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
        target_spec = self.trainer.datamodule.target_spec
        if self.generation.chat_template != target_spec.chat_template:
            log.warning(
                "generation.chat_template=%s but the vectors were computed with data.target.chat_template=%s: the "
                "steered prompts are rendered differently from the texts the vectors came from.",
                self.generation.chat_template, target_spec.chat_template,
            )
        self._variants = ([("none", 0.0)] if config.include_unsteered else []) + [
            (m, float(c)) for m in config.methods for c in config.coefficients if c != 0
        ]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        writer = find_prediction_writer(self.trainer)
        keep = writer.pending(batch["index"]) if writer is not None else list(range(len(batch["index"])))
        if not keep:
            return []
        prompts = [batch["prompt"][k] for k in keep]
        outputs = {}
        for order, (method, coefficient) in enumerate(self._variants):
            bundle = self._bundles.get(method)
            outputs[order] = generate(self._target.model, self._target.tokenizer, prompts, self.generation, bundle,
                                      coefficient if bundle else 0.0, self.predict_config.positions,
                                      block_path=self.trainer.datamodule.target_spec.block_path)
        rows = []
        for position, k in enumerate(keep):
            for order, (method, coefficient) in enumerate(self._variants):
                rows.append({"index": int(batch["index"][k]), "order": order, "id": batch["id"][k], "prompt": prompts[position],
                             "output": outputs[order][position], "method": method, "coefficient": coefficient})
        return rows

    def on_predict_end(self) -> None:
        self._target = None
