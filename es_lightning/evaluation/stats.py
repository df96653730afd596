"""Paired significance tests, spread over folds, and the gain/no-gain verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.stats import binomtest

Verdict = Literal["gain", "no gain", "worse"]


@dataclass(frozen=True)
class SignTest:
    """Exact two-sided sign test of method A against method B on the same questions.

    ``wins``: A right and B wrong; ``losses``: A wrong and B right; ``ties``: both right or both wrong.
    """

    wins: int
    losses: int
    ties: int
    p_value: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SignTest:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


@dataclass(frozen=True)
class Spread:
    """Mean and spread of a metric over folds: sample std (ddof=1, 0 for one value), standard error, range."""

    mean: float
    std: float
    sem: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Spread:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def _as_correct(values, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of per-question correctness, got shape {array.shape}.")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{what} must hold booleans (or 0/1): whether each question was answered correctly.")
    return array.astype(bool)


def sign_test(correct_a, correct_b) -> SignTest:
    """Exact two-sided binomial test on the discordant pairs; ``p_value`` is 1 when there are none."""
    a, b = _as_correct(correct_a, "correct_a"), _as_correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(
            f"Paired correctness arrays differ in length ({a.size} vs {b.size}); both must cover the same "
            f"questions in the same order."
        )
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    ties = a.size - wins - losses
    p_value = 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)
    return SignTest(wins=wins, losses=losses, ties=ties, p_value=p_value)


@dataclass(frozen=True)
class RandomControl:
    """A method against the distribution of random unit vectors scored at the method's own coefficient.

    ``draw_accuracies``: pooled test accuracy of each random draw; ``percentile``: share of draws the method beats
    (ties count half); ``p_value``: two-sided paired sign-flip permutation test of the per-question difference
    between the method's correctness and the mean correctness over the draws.
    """

    accuracy: float
    mean_accuracy: float
    draw_accuracies: tuple[float, ...]
    percentile: float
    p_value: float
    n_questions: int
    permutations: int
    test: str = "paired sign-flip permutation test on per-question differences to the mean over draws"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out["draw_accuracies"] = list(self.draw_accuracies)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RandomControl:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "draw_accuracies": tuple(data["draw_accuracies"])})

    @property
    def better(self) -> bool:
        return self.accuracy > self.mean_accuracy


def random_control(correct, draws, permutations: int = 10000, seed: int = 0) -> RandomControl:
    """Compare per-question correctness ``correct`` [N] with ``draws`` [R, N] (each random draw's correctness on the
    same questions, at the same coefficient per fold)."""
    a = _as_correct(correct, "correct").astype(float)
    d = np.asarray(draws, dtype=float)
    if d.ndim != 2 or d.shape[1] != a.size or d.shape[0] < 1:
        raise ValueError(f"draws must be [draws, {a.size}] per-question correctness, got shape {d.shape}.")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}.")
    accuracy, draw_acc = float(a.mean()), d.mean(axis=1)
    diff = a - d.mean(axis=0)
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, permutations, 1000):
        signs = rng.choice((-1.0, 1.0), size=(min(1000, permutations - start), a.size))
        exceed += int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    percentile = float(((draw_acc < accuracy).sum() + 0.5 * (draw_acc == accuracy).sum()) / len(draw_acc))
    return RandomControl(
        accuracy=accuracy,
        mean_accuracy=float(draw_acc.mean()),
        draw_accuracies=tuple(float(x) for x in draw_acc),
        percentile=percentile,
        p_value=(exceed + 1) / (permutations + 1),
        n_questions=int(a.size),
        permutations=permutations,
    )


def summarise(values: Sequence[float]) -> Spread:
    """Mean, sample std, standard error, min and max of per-fold values."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("summarise needs a non-empty 1-D list of per-fold values.")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return Spread(
        mean=float(array.mean()),
        std=std,
        sem=std / math.sqrt(array.size),
        min=float(array.min()),
        max=float(array.max()),
        n=int(array.size),
    )


def significantly_better(test: SignTest, alpha: float) -> bool:
    """More wins than losses, with a two-sided p-value below ``alpha``."""
    return test.wins > test.losses and test.p_value < alpha


def verdict(vs_none: SignTest, vs_random: RandomControl, alpha: float = 0.05) -> Verdict:
    """``"gain"`` only if the method beats both no steering (sign test) and the distribution of random vectors at the
    same coefficient (permutation test). ``"worse"`` if it is significantly worse than no steering; else
    ``"no gain"``."""
    if not 0 < alpha < 1:
        raise ValueError(f"The significance level alpha must be between 0 and 1, got {alpha}.")
    if significantly_better(vs_none, alpha) and vs_random.better and vs_random.p_value < alpha:
        return "gain"
    if vs_none.losses > vs_none.wins and vs_none.p_value < alpha:
        return "worse"
    return "no gain"
