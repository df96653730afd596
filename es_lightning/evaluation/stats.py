"""Paired significance tests, spread over folds, and the gain/no-gain verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

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
    def from_dict(cls, data: dict) -> "SignTest":
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
    def from_dict(cls, data: dict) -> "Spread":
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


def verdict(vs_none: SignTest, vs_random: SignTest, alpha: float = 0.05) -> Verdict:
    """``"gain"`` only if the method beats both no steering and the random control (at the same coefficient).

    ``"worse"`` if it is significantly worse than no steering; otherwise ``"no gain"``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"The significance level alpha must be between 0 and 1, got {alpha}.")
    if significantly_better(vs_none, alpha) and significantly_better(vs_random, alpha):
        return "gain"
    if vs_none.losses > vs_none.wins and vs_none.p_value < alpha:
        return "worse"
    return "no gain"
