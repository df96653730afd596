"""The ``test`` stage of :class:`es_lightning.module.ExpertSteer`: folds planned across the ranks (fold k on rank
k mod world), test questions scored on every rank, results gathered, the report written on rank 0. A stop or
another rank's failure ends planning between folds and scoring between batches."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from es_lightning.callbacks.common import TEST_KEPT
from es_lightning.data.folds import Fold
from es_lightning.data.question_table import QuestionTable
from es_lightning.evaluation.answers import AnswerGenerator
from es_lightning.evaluation.assemble import assemble_report
from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.generation_metrics import check_references
from es_lightning.evaluation.plots import plot_coefficient_sweep
from es_lightning.evaluation.protocol import (
    Evaluator,
    FoldPlan,
    LayerInfo,
    SharedAlignment,
    TestRecord,
    plan_folds,
    render_questions,
)
from es_lightning.evaluation.report import Report
from es_lightning.evaluation.report_markdown import write_report
from es_lightning.io import sha256_file
from es_lightning.steering.pair_search import Objective, PairSearch, PairSearchConfig
from es_lightning.steering.vectors import VectorConfig
from es_lightning.stopping import check_stop, on_every_rank, stage

log = logging.getLogger(__name__)


def on_cpu(plan: FoldPlan) -> FoldPlan:
    """``plan`` with its vectors and random draws on the CPU, to travel to the other ranks."""
    vectors = {method: {layer: v.cpu() for layer, v in by_layer.items()} for method, by_layer in plan.vectors.items()}
    return replace(plan, vectors=vectors, draws=[{layer: v.cpu() for layer, v in draw.items()} for draw in plan.draws])


def evaluation_folds(table: QuestionTable, config: EvaluationConfig, seed: int) -> list[Fold]:
    """The folds over the table's questions (indices into ``all_questions``); empty parts are refused."""
    questions = table.all_questions
    subset = list(range(len(questions)))
    if config.max_questions and config.max_questions < len(subset):
        subset = sorted(random.Random(seed).sample(subset, config.max_questions))
    local_split = None
    if config.folds is None:
        position = {q: k for k, q in enumerate(subset)}
        local_split = {name: [position[q] for q in idx if q in position] for name, idx in table.question_split.items()}
    local = plan_folds(len(subset), [questions[q].group for q in subset], config, seed, local_split)
    folds = [Fold(f.index, *(tuple(subset[k] for k in part) for part in (f.train, f.val, f.test))) for f in local]
    for fold in folds:
        empty = [name for name, part in (("train", fold.train), ("val", fold.val), ("test", fold.test)) if not part]
        if empty:
            raise ValueError(
                f"Evaluation fold {fold.index} has no {' and no '.join(empty)} questions. Use more questions, fewer "
                f"folds, or (with folds: null) non-zero val/test fractions in data.splits."
            )
    return folds


def check_folds(folds: list[Fold], table: QuestionTable, config: EvaluationConfig, pairing: PairSearchConfig) -> None:
    """Refuse, before the target is loaded, folds whose train part is too small for the nested pair search, and
    questions the generation metrics cannot score (no incorrect choice to compare with, no number, ...)."""
    if config.generation.enabled:
        questions = table.all_questions
        for metric in config.generation.metrics:
            check_references(metric, [(q.id, q.choices, q.answer) for q in questions])
    if config.protocol != "nested":
        return
    for fold in folds:
        rows = sum(len(table.question_rows[q]) for q in fold.train)
        held = max(1, round(pairing.heldout_fraction * len(fold.train)))
        per_question = rows / max(len(fold.train), 1)
        pairing.check_rows(rows, int(held * per_question), f"Evaluation fold {fold.index} (nested protocol)")


class CrossValidatedTest:
    """State of one ``test`` run. ``start`` plans every fold (rank 0), ``step`` scores a batch of test questions,
    ``finish`` gathers, assembles and writes the report (rank 0)."""

    def __init__(self, evaluation: EvaluationConfig, vectors: VectorConfig, pairing: PairSearchConfig):
        self.evaluation, self.vectors, self.pairing = evaluation, vectors, pairing
        self.plans: list[FoldPlan] = []
        self.results: list[tuple[int, int, TestRecord]] = []  # (fold, question, its record)

    def start(
        self,
        trainer,
        layout,
        objective: Objective,
        pairing_result: PairSearch,
        encoder_linear: Callable[[int], torch.Tensor],
        load_target: Callable[[], Any],
    ) -> Any:
        """Plan all folds, spread over the ranks; returns the loaded target (the caller drops it when done)."""
        datamodule = trainer.datamodule
        if datamodule.source.format.kind != "multiple_choice":
            raise ValueError(
                "`test` scores multiple-choice questions; this data source is not in the multiple_choice format."
            )
        folds = evaluation_folds(datamodule.question_table, self.evaluation, self.vectors.seed)
        check_folds(folds, datamodule.question_table, self.evaluation, self.pairing)
        with stage("loading the target model", kept=lambda: TEST_KEPT):
            target = load_target()
        self.evaluator = self._evaluator(trainer, target, layout, objective, pairing_result, encoder_linear)
        with stage("fold planning", kept=lambda: TEST_KEPT):
            parts = on_every_rank(lambda: self._plan_own_folds(trainer, folds), "the fold plans")
        self.plans = sorted((plan for part in parts for plan in part), key=lambda plan: plan.fold.index)
        self.fold_of = {q: plan.fold.index for plan in self.plans for q in plan.fold.test}
        self.results = []
        return target

    def _evaluator(
        self,
        trainer,
        target,
        layout,
        objective: Objective,
        pairing_result: PairSearch,
        encoder_linear: Callable[[int], torch.Tensor],
    ) -> Evaluator:
        """The :class:`Evaluator` of the loaded ``target`` over the data module's rendered questions."""
        datamodule = trainer.datamodule
        spec = datamodule.target_spec
        rendered = render_questions(
            target.tokenizer,
            datamodule.question_table.all_questions,
            datamodule.source.format.completion_template,
            spec.chat_template,
        )
        shared = SharedAlignment([(i, j) for i, j in pairing_result.pairs], encoder_linear)
        layers = LayerInfo(
            list(layout.expert_layers), list(layout.target_layers), layout.expert.num_layers, layout.target.num_layers
        )
        return Evaluator(
            target.model,
            target.tokenizer,
            rendered,
            datamodule.store,
            datamodule.question_table.question_rows,
            layers,
            self.evaluation,
            self.vectors,
            self.pairing,
            objective,
            shared,
            progress=trainer.is_global_zero,
            add_special_tokens=not spec.chat_template,
            block_path=spec.block_path,
            answers=self._answer_generator(target, datamodule),
        )

    def _answer_generator(self, target, datamodule) -> AnswerGenerator | None:
        """The generator of free-form answers, when the generation metrics are on."""
        if not self.evaluation.generation.enabled:
            return None
        return AnswerGenerator(
            target.model,
            target.tokenizer,
            datamodule.question_table.all_questions,
            self.evaluation.generation,
            self.evaluation.positions,
            datamodule.target_spec.block_path,
        )

    def _plan_own_folds(self, trainer, folds: list[Fold]) -> list[FoldPlan]:
        """Plan this rank's folds (fold k on rank k mod world), each plan moved to the CPU, with a log line each."""
        plans = []
        for fold in folds[trainer.global_rank :: trainer.world_size]:
            check_stop()
            start = time.perf_counter()
            plans.append(on_cpu(self.evaluator.plan(fold)))
            chosen = {m: (c.constrained, c.unconstrained) for m, c in plans[-1].choices.items()}
            log.info(
                "Fold %d/%d (%s protocol): pairs %s, coefficients (constrained, unconstrained) %s "
                "(%d train, %d val questions; %.0f s)",
                fold.index + 1,
                len(folds),
                self.evaluation.protocol,
                plans[-1].pairs,
                chosen,
                len(fold.train),
                len(fold.val),
                time.perf_counter() - start,
            )
        return plans

    def step(self, questions: list[int]) -> None:
        """Score the test variants of these questions (each in its own fold)."""
        by_fold: dict[int, list[int]] = {}
        for q in questions:
            if q in self.fold_of:
                by_fold.setdefault(self.fold_of[q], []).append(q)
        with stage("scoring test questions", kept=lambda: TEST_KEPT):
            for fold, qs in by_fold.items():
                for q, record in zip(qs, self.evaluator.score_test(self.plans[fold], qs)):
                    self.results.append((fold, q, record))

    def finish(self, trainer, dataset_name: str, meta: dict, report_dir: Path):
        """Gather every rank's results; on rank 0 write ``report.json``/``.md`` and the sweep plot. Returns the
        :class:`DatasetReport`."""
        merged: dict[tuple[int, int], TestRecord] = {}
        for part in on_every_rank(lambda: self.results, "the test results"):
            for fold, q, record in part:
                merged[(fold, q)] = record  # de-duplicates the sampler's padding
        folds = [
            (plan, [merged[(plan.fold.index, q)] for q in sorted(q for f, q in merged if f == plan.fold.index)])
            for plan in self.plans
        ]
        dataset = assemble_report(dataset_name, folds, self.evaluation, self.vectors.methods)
        if trainer.is_global_zero:
            config = self.evaluation
            ckpt = trainer.ckpt_path
            report = Report(
                model=meta["target"],
                scoring=config.scoring,
                alpha=config.alpha,
                k=len(self.plans),
                fold_mode=config.fold_mode if config.folds else "split",
                datasets=(dataset,),
                meta={
                    **meta,
                    "checkpoint": {"path": str(ckpt), "sha256": sha256_file(ckpt)} if ckpt else None,
                    "protocol": config.protocol,
                    "random_draws": config.random_draws,
                    "coefficients": list(config.coefficients),
                    "positions": config.positions,
                    "generation": asdict(config.generation),
                    "budget": asdict(config.budget),
                    "fold_plans": [
                        {
                            "fold": p.fold.index,
                            "pairs": [list(x) for x in p.pairs],
                            "chosen": p.chosen,
                            "choices": {m: asdict(c) for m, c in p.choices.items()},
                            "n_train": len(p.fold.train),
                            "n_val": len(p.fold.val),
                            "n_test": len(p.fold.test),
                            **p.diagnostics,
                        }
                        for p in self.plans
                    ],
                },
            )
            json_path, md_path = write_report(report, report_dir)
            plot_coefficient_sweep(report, report_dir / "coefficient_sweep.png")
            log.info("Evaluation report: %s, %s, %s", json_path, md_path, report_dir / "coefficient_sweep.png")
        return dataset
