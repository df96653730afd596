"""Plots of an evaluation report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from es_lightning.evaluation.report import Report
from es_lightning.io import atomic_write_with


def plot_coefficient_sweep(report: Report, path: str | Path) -> Path:
    """Write a PNG of validation accuracy (top) and, where measured, the damage (mean KL to the unsteered model on its
    own continuations, bottom) against steering coefficient: one column per data set, one line per method.

    Lines are the mean over folds; the accuracy band spans the folds' minimum to maximum.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = [d for d in report.datasets if any(m.sweep is not None for m in d.methods)]
    if not datasets:
        raise ValueError("The report has no coefficient sweeps to plot; record a SweepCurve for the steered methods.")
    damage = any(m.sweep is not None and m.sweep.mean_damage for d in datasets for m in d.methods)
    figure = Figure(figsize=(4.5 * len(datasets), 6.4 if damage else 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if damage else 1, len(datasets), squeeze=False)
    for column, data in enumerate(datasets):
        ax = axes[0][column]
        for method in data.methods:
            curve = method.sweep
            if curve is None:
                continue
            columns = [[v for v in values if v is not None] for values in zip(*curve.fold_val_accuracy)]
            lows = [100 * min(values) for values in columns]
            highs = [100 * max(values) for values in columns]
            means = [100 * a for a in curve.mean_val_accuracy]
            (line,) = ax.plot(curve.coefficients, means, marker="o", label=method.method)
            ax.fill_between(curve.coefficients, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
            if damage and curve.mean_damage.get("kl"):
                points = [(c, kl) for c, kl in zip(curve.coefficients, curve.mean_damage["kl"]) if kl is not None]
                axes[1][column].plot(
                    [c for c, _ in points],
                    [kl for _, kl in points],
                    marker="o",
                    color=line.get_color(),
                    label=method.method,
                )
        ax.set_title(data.dataset)
        ax.set_ylabel("validation accuracy (%)")
        if damage:
            budget = (report.meta.get("budget") or {}).get("max_kl")
            low = axes[1][column]
            if budget is not None:
                low.axhline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:g}")
            low.set_ylabel("KL to unsteered (nats/token)")
            low.grid(alpha=0.3)
            low.legend(fontsize="small")
        axes[-1][column].set_xlabel("steering coefficient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(path)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return path
