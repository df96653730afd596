"""The evaluation report for people (``report.md``) and the atomic writing of both report files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from es_lightning.evaluation.report import DatasetReport, MethodResult, Report
from es_lightning.evaluation.stats import RandomControl, SignTest, Spread
from es_lightning.io import atomic_write_json, atomic_write_text

NO_BUDGET = "no coefficient within budget"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _accuracy(spread: Spread | None) -> str:
    return "–" if spread is None else f"{100 * spread.mean:.1f} ± {100 * spread.std:.1f}"


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _p(test: SignTest | None) -> str:
    if test is None:
        return "–"
    p = "<0.001" if test.p_value < 0.001 else f"{test.p_value:.3g}"
    return f"{p} ({test.wins}/{test.losses})"


def _random(control: RandomControl | None) -> str:
    if control is None:
        return "–"
    p = "<0.001" if control.p_value < 0.001 else f"{control.p_value:.3g}"
    return f"{100 * control.mean_accuracy:.1f} / {100 * control.percentile:.0f}% / {p}"


def _coefficients(m: MethodResult) -> str:
    if all(fold.coefficient is None for fold in m.folds):
        return "–"
    return ", ".join(
        "–" if f.coefficient is None else (NO_BUDGET if not f.within_budget else f"{f.coefficient:g}") for f in m.folds
    )


def _both_coefficients(m: MethodResult) -> str:
    constrained = _coefficients(m)
    return constrained if m.unconstrained is None else f"{constrained} / {_coefficients(m.unconstrained)}"


def _accuracy_cell(m: MethodResult, scoring: str) -> str:
    return _accuracy(m.accuracy_mean if scoring == "mean" else m.accuracy_sum)


def _summary(data: DatasetReport, scoring: str) -> list[str]:
    lines = [
        "| Dataset | Method | MC accuracy | Generation accuracy | KL | CE increase | Empty | "
        "Coefficient per fold (constrained / unconstrained) | MC verdict | Generation verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in data.methods:
        gen = m.generation
        primary = gen.metrics[0] if gen else None
        lines.append(
            _row(
                [
                    data.dataset,
                    m.method,
                    _accuracy_cell(m, scoring),
                    "–" if gen is None or primary is None else f"{_accuracy(gen.accuracy[primary])} ({primary})",
                    _number(None if gen is None else gen.kl),
                    _number(None if gen is None else gen.ce_increase),
                    _percent(None if gen is None else gen.empty),
                    _both_coefficients(m),
                    m.verdict or "–",
                    (gen.verdict if gen else None) or "–",
                ]
            )
        )
    return lines


def _choice_table(data: DatasetReport, unconstrained: bool) -> list[str]:
    lines = [
        "| Method | Accuracy (sum) | Accuracy (mean/token) | Coefficient per fold | p vs none (W/L) "
        "| Random draws: mean / beaten / p | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in data.methods:
        shown = m.unconstrained if unconstrained and m.unconstrained is not None else m
        lines.append(
            _row(
                [
                    m.method,
                    _accuracy(shown.accuracy_sum),
                    _accuracy(shown.accuracy_mean),
                    _coefficients(shown),
                    _p(shown.vs_none),
                    _random(shown.vs_random),
                    shown.verdict or "–",
                ]
            )
        )
    return lines


def _generation_table(data: DatasetReport) -> list[str]:
    rows = [(m.method, "constrained", m.generation) for m in data.methods if m.generation is not None]
    rows += [
        (m.method, "unconstrained", m.unconstrained.generation)
        for m in data.methods
        if m.unconstrained is not None and m.unconstrained.generation is not None
    ]
    if not rows:
        return []
    metrics = rows[0][2].metrics
    head = (
        ["Method", "Coefficient"]
        + [f"{metric} (p vs none / random)" for metric in metrics]
        + ["Empty", "Repeated 3-grams", "Perplexity (unsteered)", "KL", "CE increase", "Verdict"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, kind, gen in rows:
        cells = [method, "–" if method == "none" else kind]
        for metric in metrics:
            tests = [
                _p(gen.vs_none[metric]) if gen.vs_none else "–",
                _random(gen.vs_random[metric]) if gen.vs_random else "–",
            ]
            cells.append(f"{_accuracy(gen.accuracy[metric])} ({tests[0]}; {tests[1]})")
        cells += [
            _percent(gen.empty),
            _percent(gen.repetition),
            _number(gen.perplexity),
            _number(gen.kl),
            _number(gen.ce_increase),
            gen.verdict or "–",
        ]
        lines.append(_row(cells))
    return lines


def _sweep_table(data: DatasetReport) -> list[str]:
    swept = [m for m in data.methods if m.sweep is not None]
    if not swept:
        return []
    grid = sorted({c for m in swept for c in m.sweep.coefficients})  # type: ignore[union-attr]
    damage = any(m.sweep.mean_damage for m in swept)  # type: ignore[union-attr]
    head = ["Coefficient"] + [m.method + (" (acc / KL / empty)" if damage else "") for m in swept]
    lines = ["| " + " | ".join(_cell(h) for h in head) + " |", "|---" * len(head) + "|"]
    for c in grid:
        row = [f"{c:g}"]
        for m in swept:
            curve = m.sweep
            if c not in curve.coefficients:  # type: ignore[union-attr]
                row.append("–")
                continue
            k = curve.coefficients.index(c)  # type: ignore[union-attr]
            cell = f"{100 * curve.mean_val_accuracy[k]:.1f}"  # type: ignore[union-attr]
            if damage:
                kl, empty = (curve.mean_damage.get(name, (None,) * (k + 1))[k] for name in ("kl", "empty"))  # type: ignore[union-attr]
                cell += f" / {_number(kl)} / {_percent(empty)}"
            row.append(cell)
        lines.append(_row(row))
    return lines


def render_markdown(report: Report) -> str:
    """The report as markdown: a summary (multiple choice, generation, damage, both coefficient choices), then the
    multiple-choice tests at the constrained and unconstrained coefficients, generation details and the sweeps."""
    label = {"sum": "summed log-prob", "mean": "mean log-prob per token"}[report.scoring]
    folds = (
        f"{report.k}-fold {report.fold_mode} cross-validation. "
        if report.fold_mode != "split"
        else "The data module's train/val/test split. "
    )
    lines = [
        f"# Evaluation of {report.model}",
        "",
        folds + "Accuracy in %, mean ± sample std over folds. Each method's coefficient is chosen per fold on its "
        "validation part: *constrained*, the best validation accuracy among coefficients whose damage (KL on the "
        "target's own unsteered continuations, empty and repetitive answers) stays within the budget, used by "
        "`predict` and the exports; *unconstrained*, the best validation accuracy alone. Against no steering: exact "
        "two-sided sign test (wins/losses) pooling all test folds. Against random: the random draws scored at the "
        "method's own coefficient in each fold: their mean accuracy, the share of draws the method beats, and a "
        "two-sided paired sign-flip permutation test against the draws' mean. Multiple choice (MC) uses the "
        f"{label} scoring. A gain needs p < {report.alpha:g} against both no steering and the random draws, "
        "separately for MC and for generated answers. KL and CE increase are nats per token on the test questions' "
        "unsteered answers; empty is the share of empty generated answers.",
    ]
    for data in report.datasets:
        lines += ["", f"## {data.dataset}: summary", "", *_summary(data, report.scoring)]
        lines += ["", "### Multiple choice at the constrained coefficient", "", *_choice_table(data, False)]
        if any(m.unconstrained is not None for m in data.methods):
            lines += ["", "### Multiple choice at the unconstrained coefficient", "", *_choice_table(data, True)]
        generation = _generation_table(data)
        if generation:
            lines += ["", "### Generated answers (random draws at the constrained coefficient)", "", *generation]
        sweep = _sweep_table(data)
        if sweep:
            lines += ["", "### Coefficient sweep (validation, mean over folds)", "", *sweep]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    atomic_write_json(json_path, report.to_dict())
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path
