"""Evaluation report: JSON round trip, markdown table, sweep plot, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from es_lightning.evaluation.plots import plot_coefficient_sweep
from es_lightning.evaluation.report import (
    DatasetReport,
    FoldResult,
    GenerationResult,
    Report,
    load_report,
    method_result,
    sweep_curve,
)
from es_lightning.evaluation.report_markdown import render_markdown, write_report
from es_lightning.evaluation.stats import random_control, sign_test, summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def correct_array(n: int, right: set[int]) -> np.ndarray:
    return np.array([q in right for q in range(n)])


def make_report() -> Report:
    """Two data sets, three methods; on "truthfulqa" expertsteer wins 9/1 vs none and 6/0 vs random."""
    n = 20
    none = correct_array(n, set(range(8)))  # 8 right
    random = correct_array(n, set(range(9)) - {0} | {10})  # 9 right
    steer = correct_array(n, set(range(8)) - {0} | set(range(8, 17)))  # 16 right
    draws = np.stack([correct_array(n, set(range(d, d + 8 + d % 2))) for d in range(4)])  # 8-9 right each

    def folds(acc_sum, acc_mean, coefficients):
        return [FoldResult(i, c, s, m, 10) for i, (s, m, c) in enumerate(zip(acc_sum, acc_mean, coefficients))]

    damage = [
        {0.0: {"kl": 0.0, "empty": 0.0}, 2.0: {"kl": 0.1, "empty": 0.0}, 4.0: {"kl": 0.5, "empty": 0.25}},
        {0.0: {"kl": 0.0, "empty": 0.0}, 2.0: {"kl": 0.3, "empty": 0.0}, 4.0: {"kl": 0.7, "empty": 0.75}},
    ]
    sweep = sweep_curve([{0.0: 0.4, 2.0: 0.6, 4.0: 0.7}, {4.0: 0.5, 0.0: 0.3, 2.0: 0.8}], damage)
    generation = GenerationResult(
        ("bleu_acc",),
        {"bleu_acc": summarise([0.3, 0.5])},
        empty=0.05,
        repetition=0.1,
        perplexity=12.5,
        kl=0.2,
        ce_increase=0.4,
        vs_none={"bleu_acc": sign_test(steer, none)},
        vs_random={"bleu_acc": random_control(steer, draws)},
        verdict="gain",
    )
    unconstrained = method_result("expertsteer", folds([0.9, 0.9], [0.9, 0.9], [8.0, 8.0]), steer, none, draws)
    random_sweep = sweep_curve([{0.0: 0.4, 2.0: 0.42, 4.0: 0.38}, {0.0: 0.3, 2.0: 0.33, 4.0: 0.31}])
    truthful = DatasetReport(
        dataset="truthfulqa",
        n_questions=n,
        methods=(
            method_result("none", folds([0.4, 0.4], [0.5, 0.3], [None, None])),
            method_result(
                "random", folds([0.45, 0.45], [0.5, 0.4], [4.0, 2.0]), random, correct_none=none, sweep=random_sweep
            ),
            method_result(
                "expertsteer",
                folds([0.8, 0.8], [0.7, 0.9], [4.0, 2.0]),
                steer,
                correct_none=none,
                random_draws=draws,
                sweep=sweep,
                generation=generation,
                unconstrained=unconstrained,
            ),
        ),
    )
    pubmed = DatasetReport(
        dataset="pubmedqa",
        n_questions=n,
        methods=(
            method_result("none", folds([0.5, 0.6], [0.5, 0.6], [None, None])),
            method_result(
                "expertsteer",
                [FoldResult(0, 0.0, 0.5, 0.5, 10, within_budget=False), FoldResult(1, 1.0, 0.6, 0.6, 10)],
                none,
                none,
                np.stack([none, none]),
            ),
        ),
    )
    return Report(model="tiny-llama", scoring="mean", alpha=0.05, k=2, fold_mode="random", datasets=(truthful, pubmed))


def test_method_result_tests_and_verdict():
    report = make_report()
    truthful, pubmed = report.datasets
    steer = truthful.methods[2]
    assert (steer.vs_none.wins, steer.vs_none.losses, steer.vs_none.ties) == (9, 1, 10)
    assert steer.vs_none.p_value == pytest.approx(22 / 1024)
    assert steer.vs_random.draw_accuracies == pytest.approx((0.4, 0.45, 0.4, 0.45))
    assert steer.vs_random.mean_accuracy == pytest.approx(0.425) and steer.vs_random.percentile == 1.0
    assert steer.vs_random.p_value < 0.01
    assert steer.verdict == "gain"
    assert steer.coefficients == (4.0, 2.0)
    assert steer.accuracy_mean.mean == pytest.approx(0.8) and steer.accuracy_mean.std == pytest.approx(2**0.5 * 0.1)
    assert truthful.methods[1].verdict is None and truthful.methods[1].vs_random is None
    assert pubmed.methods[1].verdict == "no gain" and pubmed.methods[1].vs_none.p_value == 1.0
    assert steer.sweep.coefficients == (0.0, 2.0, 4.0)
    assert steer.sweep.mean_val_accuracy == pytest.approx((0.35, 0.7, 0.6))
    assert steer.sweep.mean_damage["kl"] == pytest.approx((0.0, 0.2, 0.6))
    assert steer.sweep.mean_damage["empty"] == pytest.approx((0.0, 0.0, 0.5))
    assert steer.sweep.mean_damage["perplexity"] == (None, None, None)  # not measured in any fold


def test_method_result_and_sweep_errors():
    fold = FoldResult(0, 1.0, 0.5, 0.5, 4)
    with pytest.raises(ValueError, match="own per-question correctness"):
        method_result("x", [fold], correct_none=[True, False])
    with pytest.raises(ValueError, match="no fold results"):
        method_result("x", [])
    partial = sweep_curve([{0.0: 0.5, 1.0: 0.6, 2.0: 0.2}, {0.0: 0.5, 1.0: 0.4}])  # fold 1 stopped before 2.0
    assert partial.fold_val_accuracy[1] == (0.5, 0.4, None) and partial.mean_val_accuracy == pytest.approx(
        (0.5, 0.5, 0.2)
    )
    with pytest.raises(ValueError, match="Unknown scoring"):
        Report(model="m", scoring="max", alpha=0.05, k=2, fold_mode="random", datasets=())


def test_report_json_round_trip_and_no_temp_files(tmp_path):
    report = make_report()
    json_path, md_path = write_report(report, tmp_path / "out")
    assert load_report(json_path) == report
    assert load_report(tmp_path / "out") == report
    assert json.loads(json_path.read_text())["datasets"][0]["methods"][2]["verdict"] == "gain"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]
    assert md_path.read_text() == render_markdown(report)
    data = json.loads(json_path.read_text())
    data["format"] = 99
    with pytest.raises(ValueError, match="format"):
        Report.from_dict(data)


def test_markdown_table_rows():
    report = make_report()
    text = render_markdown(report)
    summary = [line for line in text.splitlines() if line.startswith("| truthfulqa") or line.startswith("| pubmedqa")]
    assert summary == [
        "| truthfulqa | none | 40.0 ± 14.1 | – | – | – | – | – | – | – |",
        "| truthfulqa | random | 45.0 ± 7.1 | – | – | – | – | 4, 2 | – | – |",
        "| truthfulqa | expertsteer | 80.0 ± 14.1 | 40.0 ± 14.1 (bleu_acc) | 0.2 | 0.4 | 5% | 4, 2 / 8, 8 "
        "| gain | gain |",
        "| pubmedqa | none | 55.0 ± 7.1 | – | – | – | – | – | – | – |",
        "| pubmedqa | expertsteer | 55.0 ± 7.1 | – | – | – | – | no coefficient within budget, 1 | no gain | – |",
    ]
    p = report.datasets[0].methods[2].vs_random.p_value
    assert f"| expertsteer | 80.0 ± 0.0 | 80.0 ± 14.1 | 4, 2 | 0.0215 (9/1) | 42.5 / 100% / {p:.3g} | gain |" in text
    assert f"| expertsteer | 90.0 ± 0.0 | 90.0 ± 0.0 | 8, 8 | 0.0215 (9/1) | 42.5 / 100% / {p:.3g} | gain |" in text
    assert (
        f"| expertsteer | constrained | 40.0 ± 14.1 (0.0215 (9/1); 42.5 / 100% / {p:.3g}) | 5% | 10% | 12.5 | 0.2 "
        f"| 0.4 | gain |"
    ) in text
    assert "| 2 | 37.5 / – / – | 70.0 / 0.2 / 0% |" in text  # sweep row: coefficient 2, random then expertsteer
    assert "| 4 | 34.5 / – / – | 60.0 / 0.6 / 50% |" in text


def test_sweep_plot_is_a_png(tmp_path):
    path = plot_coefficient_sweep(make_report(), tmp_path / "plots" / "sweep.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["sweep.png"]
    bare = Report(model="m", scoring="sum", alpha=0.05, k=2, fold_mode="random", datasets=(make_report().datasets[1],))
    with pytest.raises(ValueError, match="no coefficient sweeps"):
        plot_coefficient_sweep(bare, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
