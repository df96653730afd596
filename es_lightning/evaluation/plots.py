"""Plots of an evaluation report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from es_lightning.evaluation.report import Report
from es_lightning.io import atomic_write_with


def plot_coefficient_sweep(report: Report, path: str | Path) -> Path:
    """Write a PNG of validation accuracy against steering coefficient: one panel per data set, one line per method.

    Lines are the mean over folds; the band spans the folds' minimum to maximum.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = [d for d in report.datasets if any(m.sweep is not None for m in d.methods)]
    if not datasets:
        raise ValueError("The report has no coefficient sweeps to plot; record a SweepCurve for the steered methods.")
    figure = Figure(figsize=(4.5 * len(datasets), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    for ax, data in zip(axes, datasets):
        for method in data.methods:
            curve = method.sweep
            if curve is None:
                continue
            columns = [[v for v in column if v is not None] for column in zip(*curve.fold_val_accuracy)]
            lows = [100 * min(column) for column in columns]
            highs = [100 * max(column) for column in columns]
            means = [100 * a for a in curve.mean_val_accuracy]
            (line,) = ax.plot(curve.coefficients, means, marker="o", label=method.method)
            ax.fill_between(curve.coefficients, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(data.dataset)
        ax.set_xlabel("steering coefficient")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(path)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return path
