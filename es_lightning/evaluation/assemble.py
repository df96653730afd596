"""From per-fold test correctness to a :class:`DatasetReport`: spreads, sign tests, random-draw tests, verdicts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from es_lightning.evaluation.config import EvaluationConfig
from es_lightning.evaluation.protocol import DRAW, NONE, FoldPlan
from es_lightning.evaluation.report import DatasetReport, FoldResult, method_result, sweep_curve


def assemble_report(
    dataset: str,
    plans: Sequence[FoldPlan],
    results: dict[int, dict[tuple[str, float], dict[str, torch.Tensor]]],
    test_questions: dict[int, Sequence[int]],
    config: EvaluationConfig,
    methods: Sequence[str],
) -> DatasetReport:
    """Per-method fold accuracies and spreads; sign tests against no steering and permutation tests against the
    random draws scored at the method's own coefficient in each fold (pooled over folds); verdicts."""
    scoring = config.scoring
    rows = [NONE] + list(methods)
    pooled: dict[str, list[torch.Tensor]] = {m: [] for m in rows}
    pooled_draws: dict[str, list[torch.Tensor]] = {m: [] for m in rows}
    fold_results: dict[str, list[FoldResult]] = {m: [] for m in rows}
    for plan in plans:
        fold = plan.fold.index
        if not len(test_questions.get(fold, [])):
            continue
        fold_scores = results[fold]
        for method in rows:
            coefficient = 0.0 if method == NONE else plan.chosen[method]
            correct = fold_scores[(method, coefficient)]
            draws = None
            if method not in (NONE, "random"):
                draws = torch.stack([fold_scores[(f"{DRAW}{d}", coefficient)][scoring] for d in range(len(plan.draws))])
                pooled_draws[method].append(draws)
            fold_results[method].append(FoldResult(
                fold, None if method == NONE else coefficient, correct["sum"].float().mean().item(),
                correct["mean"].float().mean().item(), len(correct["mean"]),
                None if draws is None else tuple(draws.float().mean(1).tolist()),
            ))
            pooled[method].append(correct[scoring])
    none = torch.cat(pooled[NONE])
    entries = []
    for method in rows:
        if method == NONE:
            entries.append(method_result(NONE, fold_results[NONE], alpha=config.alpha))
            continue
        sweep = sweep_curve([plan.sweep[method] for plan in plans])
        draws = torch.cat(pooled_draws[method], dim=1) if pooled_draws[method] else None
        entries.append(method_result(method, fold_results[method], torch.cat(pooled[method]), none, draws,
                                     sweep=sweep, alpha=config.alpha, permutations=config.permutations))
    return DatasetReport(dataset, sum(len(q) for q in test_questions.values()), tuple(entries))
