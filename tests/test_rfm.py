"""RFM concept directions: planted directions, sign, coordinates, validation scores, solver fallback and bad input."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from xrfm.rfm_src import RFM

from es_lightning.steering.rfm import _RFM, KERNEL, _ridge_solve, cap_rows, fit_rfm

CHEAP = {"bandwidths": (1.0,), "regs": (0.1,), "iters": 1}


def planted(
    n: int, d: int, seed: int, scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian X [n, d] (column scales ``scales``), a hidden unit u and t = X @ u."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    x = torch.randn(n, d, generator=g) * (1.0 if scales is None else scales)
    return x, u, x @ u + 0.2 * torch.randn(n, generator=g)


def test_planted_direction_recovered_with_grid_and_refit() -> None:
    x, u, t = planted(1000, 64, seed=1)
    y = (t**3 > 0).long()
    result = fit_rfm(x, y, bandwidths=(1.0, 4.0), regs=(1.0,), grid_max_train=400)
    cos = float(result.direction @ u)
    assert cos > 0.9
    assert result.direction.shape == (64,) and float(result.direction.norm()) == pytest.approx(1.0, abs=1e-5)
    assert result.agop.shape == (64, 64) and torch.allclose(result.agop, result.agop.T, atol=1e-6)
    assert float(result.agop.max()) == pytest.approx(1.0)
    assert (result.n_train, result.n_val, result.n_grid_train) == (800, 200, 400)
    assert [(b, r) for b, r, _ in result.grid_scores] == [(1.0, 1.0), (4.0, 1.0)]
    assert result.metric == "auc" and result.val_score > 0.8 and result.top_fraction > 0.5
    assert result.bandwidth > 0 and result.reg == 1.0 and result.iters == 3


def test_sign_follows_the_label() -> None:
    x, u, t = planted(600, 32, seed=2)
    direction = fit_rfm(x.numpy(), (t < 0).numpy().astype(int), **CHEAP).direction  # label 1 when x.u is small
    assert float(direction @ u) < -0.9


def test_direction_is_in_original_coordinates_when_standardising() -> None:
    scales = torch.logspace(-0.5, 0.5, 32)[torch.randperm(32, generator=torch.Generator().manual_seed(0))]
    x, u, t = planted(1000, 32, seed=3, scales=scales)
    direction = fit_rfm(x, (t > 0).long(), **CHEAP).direction
    # the direction in the standardised space (proportional to sigma * u, so not mapped back) gives about 0.8 here
    assert float(direction @ u) > 0.9


def test_random_labels_give_a_low_validation_score_quietly_and_leave_global_rng_alone(
    capsys: pytest.CaptureFixture,
) -> None:
    x, _, _ = planted(600, 32, seed=4)
    y = torch.randint(0, 2, (600,), generator=torch.Generator().manual_seed(5))
    state = torch.random.get_rng_state()
    first = fit_rfm(x, y, **CHEAP)
    assert torch.equal(state, torch.random.get_rng_state())
    assert first.val_score < 0.65
    assert torch.equal(first.direction, fit_rfm(x, y, **CHEAP).direction)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # xrfm's prints and progress bars stay off


def test_one_hot_labels_use_accuracy_and_the_positive_class_for_the_sign() -> None:
    x, u, t = planted(900, 32, seed=6)
    classes = torch.full((900,), 2)
    classes[t < -0.4] = 0
    classes[t > 0.4] = 1
    y = torch.nn.functional.one_hot(classes, 3)
    result = fit_rfm(x, y, **CHEAP)
    assert result.metric == "accuracy" and result.val_score > 0.6
    assert float(result.direction @ u) > 0.9
    assert float(fit_rfm(x, y, positive_class=0, **CHEAP).direction @ u) < -0.9


def test_ridge_solve_warns_and_raises_the_ridge_when_singular() -> None:
    with pytest.warns(RuntimeWarning, match="retrying with reg="):
        alpha, used = _ridge_solve(torch.ones(6, 6), torch.ones(6, 1), 0.0)
    assert used > 0 and torch.isfinite(alpha).all()
    assert torch.allclose((torch.ones(6, 6) + used * torch.eye(6)) @ alpha, torch.ones(6, 1), atol=1e-3)


def test_fit_warns_on_duplicate_rows_without_ridge() -> None:
    x, _, t = planted(100, 8, seed=7)
    x, y = torch.cat([x, x]), torch.cat([t > 0, t > 0]).long()
    with pytest.warns(RuntimeWarning, match="ill-conditioned or failed"):
        result = fit_rfm(x, y, bandwidths=(1.0,), regs=(0.0,), iters=1)
    assert result.reg > 0 and torch.isfinite(result.direction).all()


def test_solver_matches_xrfm_lstsq_on_the_same_data() -> None:
    x, _, t = planted(300, 16, seed=8)
    targets = (t > 0).float()[:, None]
    reference = RFM(kernel=KERNEL, bandwidth=5.0, device="cpu", verbose=False)
    reference.reg, reference.solver = 0.1, "solve"
    ours = _RFM(kernel=KERNEL, bandwidth=5.0, device="cpu", verbose=False)
    ours.reg = 0.1
    expected = reference.fit_predictor_lstsq(x, targets)
    assert torch.allclose(
        ours.fit_predictor_lstsq(x, targets), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())
    )


def _x(n: int = 40, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize(
    ("x", "y", "options", "message"),
    [
        (_x(), torch.ones(40), {}, "single class"),
        (_x(), torch.tensor([1] + [0] * 39), {}, "Class 1 has 1 example(s)"),
        (
            _x().index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))),
            torch.arange(40) % 2,
            {},
            "NaN or Inf",
        ),
        (_x(), torch.arange(39) % 2, {}, "pass one label per row of X"),
        (_x()[0], torch.arange(40) % 2, {}, "X must have shape [n, d]"),
        (_x(), torch.arange(40) % 3, {}, "map the labels to 0/1"),
        (_x(), torch.ones(40, 3), {}, "exactly one 1 per row"),
        (_x(), torch.nn.functional.one_hot(torch.arange(40) % 2, 3), {}, "Class 2 has 0 example(s)"),
        (_x(), torch.nn.functional.one_hot(torch.arange(40) % 2, 2), {"positive_class": 2}, "positive_class=2"),
        (_x(), torch.arange(40) % 2, {"val_fraction": 1.0}, "val_fraction=0.2"),
        (_x(), torch.arange(40) % 2, {"regs": ()}, "regs must be"),
        (_x(), torch.arange(40) % 2, {"bandwidths": (0.0,)}, "bandwidths must be"),
        (_x(), torch.arange(40) % 2, {"iters": 0}, "iters=3"),
    ],
)
def test_bad_input_raises_with_fix(x: torch.Tensor, y: torch.Tensor, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_rfm(x, y, **options)


def test_labels_and_their_complement_give_opposite_directions() -> None:
    x, u, t = planted(400, 16, seed=5)
    y = (t > 0).long()
    a, b = fit_rfm(x, y, **CHEAP).direction, fit_rfm(x, 1 - y, **CHEAP).direction
    assert float(a @ u) > 0.8 and float(a @ b) < -0.95  # not exactly -1: the kernel fit of 1 - y has no intercept


def test_grouped_validation_split_keeps_each_group_on_one_side() -> None:
    x, u, t = planted(400, 16, seed=6)
    y = (t > 0).long()
    groups = [f"q{r // 4}" for r in range(400)]  # 100 questions of 4 rows
    result = fit_rfm(x, y, groups=groups, val_fraction=0.25, **CHEAP)
    assert result.n_val == 100 and result.n_train == 300  # 25 whole groups held out
    with pytest.raises(ValueError, match="one key per row"):
        fit_rfm(x, y, groups=groups[:10], **CHEAP)
    with pytest.raises(ValueError, match="at least 2 groups"):
        fit_rfm(x, y, groups=["same"] * 400, **CHEAP)


def test_row_cap_keeps_whole_groups_deterministically() -> None:
    groups = [f"q{r // 3}" for r in range(300)] + [f"w{r // 5}" for r in range(100)]  # 100 + 20 groups, sizes 3 and 5
    kept = cap_rows(groups, 100, seed=0)
    assert len(kept) <= 100 and len(kept) >= 96  # filled up to the cap but for the last group that would overflow it
    chosen = {groups[r] for r in kept}
    assert sorted(kept) == sorted(r for r, g in enumerate(groups) if g in chosen)  # every row of a chosen group
    assert np.array_equal(kept, cap_rows(groups, 100, seed=0))
    assert not np.array_equal(kept, cap_rows(groups, 100, seed=1))


def test_fit_above_the_cap_subsamples_and_logs_the_kernel(caplog: pytest.LogCaptureFixture) -> None:
    x, u, t = planted(400, 16, seed=6)
    y, groups = (t > 0).long(), [f"q{r // 4}" for r in range(400)]
    with caplog.at_level(logging.INFO, logger="es_lightning.steering.rfm"):
        capped = fit_rfm(x, y, groups=groups, max_rows=200, **CHEAP)
    assert capped.n_input == 400 and capped.n_train + capped.n_val == 200
    assert (
        "RFM on a seeded 200 of 400 rows (whole questions; max_rows=200)" in caplog.text and "n_train^2" in caplog.text
    )
    again = fit_rfm(x, y, groups=groups, max_rows=200, **CHEAP)
    assert torch.equal(capped.direction, again.direction)


def test_rows_within_the_cap_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    x, _, t = planted(300, 16, seed=2)
    y = (t > 0).long()
    with caplog.at_level(logging.INFO, logger="es_lightning.steering.rfm"):
        capped = fit_rfm(x, y, max_rows=300, **CHEAP)
    assert "seeded" not in caplog.text
    assert torch.equal(capped.direction, fit_rfm(x, y, max_rows=None, **CHEAP).direction)
    with pytest.raises(ValueError, match="max_rows must be at least 10"):
        fit_rfm(x, y, max_rows=5, **CHEAP)


def test_device_argument_reaches_the_kernel_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from es_lightning.steering import rfm

    seen = []
    original = rfm._fit_one
    monkeypatch.setattr(rfm, "_fit_one", lambda *args: seen.append(args[-1]) or original(*args))
    x, _, t = planted(200, 8, seed=3)
    fit_rfm(x, (t > 0).long(), device="cpu", **CHEAP)
    fit_rfm(x.numpy(), (t > 0).long(), **CHEAP)  # default: the device of X (cpu for arrays)
    assert seen == [torch.device("cpu"), torch.device("cpu")]


def test_grouped_validation_split_never_puts_a_question_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Column 0 holds the question, so the rows each kernel fit trains and validates on name their questions."""
    from es_lightning.steering import rfm

    seen = []
    original = rfm._fit_one
    monkeypatch.setattr(rfm, "_fit_one", lambda *args: seen.append((args[0], args[2])) or original(*args))
    x, _, t = planted(240, 8, seed=11)
    question = torch.arange(240) // 4  # 60 questions of 4 rows, labels mixed within a question
    x[:, 0] = question.float()
    fit_rfm(x, (t > 0).long(), groups=[f"q{int(q)}" for q in question], val_fraction=0.25, **CHEAP)
    train, val = seen[0]
    in_train, in_val = {round(v, 4) for v in train[:, 0].tolist()}, {round(v, 4) for v in val[:, 0].tolist()}
    assert not in_train & in_val
    assert (len(in_train), len(in_val)) == (45, 15) and (len(train), len(val)) == (180, 60)
