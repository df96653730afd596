"""From per-fold test records to a :class:`DatasetReport`: spreads, sign tests, random-draw tests, verdicts, for
multiple choice and generated answers, at each method's constrained and unconstrained coefficients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.damage import AnswerHealth, Damage
from es_lightning.evaluation.fold_plan import DRAW, NONE, FoldPlan, TestRecord, VariantKey
from es_lightning.evaluation.report import (
    DatasetReport,
    FoldResult,
    GenerationResult,
    MethodResult,
    method_result,
    sweep_curve,
)
from es_lightning.evaluation.stats import random_control, sign_test, summarise, verdict

FoldRecords = Sequence[tuple[FoldPlan, Sequence[TestRecord]]]  # each fold's plan and its test questions' records


def _key(key: VariantKey) -> VariantKey:
    """Keys at coefficient 0 were not scored again: they are no steering."""
    return (NONE, 0.0) if key[1] == 0 else key


def _choice(records: Sequence[TestRecord], key: VariantKey, scoring: str) -> torch.Tensor:
    return torch.tensor([r.choice[_key(key)][scoring] for r in records], dtype=torch.bool)


def _correct(records: Sequence[TestRecord], key: VariantKey, metric: str) -> torch.Tensor:
    return torch.tensor([r.generated[_key(key)].correct[metric] for r in records], dtype=torch.bool)


def _generation(
    folds: FoldRecords, coefficient_of, metrics: Sequence[str], config: EvaluationConfig, with_draws: bool
) -> GenerationResult | None:
    """The generated answers of one variant per fold (``coefficient_of(plan)`` gives its key), tested against no
    steering and, ``with_draws``, against the random draws at the same coefficient."""
    if not folds or not all(records and records[0].generated for _, records in folds):
        return None
    keys = [coefficient_of(plan) for plan, _ in folds]
    accuracy = {
        m: summarise([_correct(records, key, m).float().mean().item() for (_, records), key in zip(folds, keys)])
        for m in metrics
    }
    answers = [r.generated[_key(key)] for (_, records), key in zip(folds, keys) for r in records]
    health = sum((a.health for a in answers), AnswerHealth())
    damage = sum((a.damage for a in answers), Damage())
    vs_none = vs_random = None
    steered = keys[0][0] != NONE
    if steered:
        vs_none = {
            m: sign_test(
                torch.cat([_correct(r, k, m) for (_, r), k in zip(folds, keys)]),
                torch.cat([_correct(r, (NONE, 0.0), m) for _, r in folds]),
            )
            for m in metrics
        }
    if steered and with_draws:
        vs_random = {}
        for m in metrics:
            draws = torch.cat(
                [
                    torch.stack(
                        [
                            _correct(r, (f"{DRAW}{d}", k[1]), m)
                            for d in range(min(len(plan.draws), config.generation_draws()))
                        ]
                    )
                    for (plan, r), k in zip(folds, keys)
                ],
                dim=1,
            )
            vs_random[m] = random_control(
                torch.cat([_correct(r, k, m) for (_, r), k in zip(folds, keys)]),
                draws,
                permutations=config.permutations,
            )
    primary = metrics[0]
    return GenerationResult(
        tuple(metrics),
        accuracy,
        health.empty_share,
        health.repetition,
        health.perplexity,
        damage.kl,
        damage.ce_increase,
        vs_none,
        vs_random,
        verdict(vs_none[primary], vs_random[primary], config.alpha) if vs_none and vs_random else None,
    )


def _method(folds: FoldRecords, method: str, config: EvaluationConfig, unconstrained: bool) -> MethodResult:
    """One steered method at its constrained (or unconstrained) coefficient in each fold."""
    scoring, metrics = config.scoring, config.generation.metrics
    fold_results, pooled, pooled_draws, pooled_none = [], [], [], []
    for plan, records in folds:
        choice = plan.choices[method]
        coefficient = choice.unconstrained if unconstrained else choice.applied
        correct = {s: _choice(records, (method, coefficient), s) for s in ("mean", "sum")}
        draws = None
        if method != "random":
            draws = torch.stack(
                [_choice(records, (f"{DRAW}{d}", coefficient), scoring) for d in range(len(plan.draws))]
            )
            pooled_draws.append(draws)
        fold_results.append(
            FoldResult(
                plan.fold.index,
                coefficient,
                correct["sum"].float().mean().item(),
                correct["mean"].float().mean().item(),
                len(records),
                None if draws is None else tuple(draws.float().mean(1).tolist()),
                within_budget=unconstrained or choice.constrained is not None,
            )
        )
        pooled.append(correct[scoring])
        pooled_none.append(_choice(records, (NONE, 0.0), scoring))
    generation = _generation(
        folds,
        lambda plan: (method, plan.choices[method].unconstrained if unconstrained else plan.choices[method].applied),
        metrics,
        config,
        with_draws=not unconstrained and method != "random",
    )
    sweep = None
    if not unconstrained:
        sweep = sweep_curve(
            [{c: p.accuracy for c, p in plan.sweep[method].items()} for plan, _ in folds],
            [{c: p.to_dict() for c, p in plan.sweep[method].items()} for plan, _ in folds],
        )
    return method_result(
        method,
        fold_results,
        torch.cat(pooled),
        torch.cat(pooled_none),
        torch.cat(pooled_draws, dim=1) if pooled_draws else None,
        sweep=sweep,
        alpha=config.alpha,
        permutations=config.permutations,
        generation=generation,
        unconstrained=None if unconstrained else _method(folds, method, config, unconstrained=True),
    )


def assemble_report(
    dataset: str, folds: FoldRecords, config: EvaluationConfig, methods: Sequence[str]
) -> DatasetReport:
    """Per-method fold accuracies and spreads; sign tests against no steering and permutation tests against the
    random draws scored at the method's own coefficient in each fold (pooled over folds); verdicts; for multiple
    choice and, when evaluated, for generated answers."""
    folds = [(plan, records) for plan, records in folds if records]
    none_folds = [
        FoldResult(
            plan.fold.index,
            None,
            _choice(r, (NONE, 0.0), "sum").float().mean().item(),
            _choice(r, (NONE, 0.0), "mean").float().mean().item(),
            len(r),
        )
        for plan, r in folds
    ]
    none = method_result(
        NONE,
        none_folds,
        alpha=config.alpha,
        generation=_generation(folds, lambda plan: (NONE, 0.0), config.generation.metrics, config, False),
    )
    entries = [none] + [_method(folds, method, config, unconstrained=False) for method in methods]
    return DatasetReport(dataset, sum(len(r) for _, r in folds), tuple(entries))
