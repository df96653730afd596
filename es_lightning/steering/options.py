"""One place that checks steering-method names and coefficients, for every config that takes them."""

from __future__ import annotations

import math
from collections.abc import Sequence

METHODS = ("expertsteer", "rfm_self", "mean_difference", "random")


def check_methods(methods: Sequence[str], where: str) -> None:
    """Refuse unknown method names, naming the setting (``where``) and the known methods."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown} in {where}: use some of {list(METHODS)}.")
    if not methods:
        raise ValueError(f"{where} is empty: give at least one of {list(METHODS)}.")


def check_coefficient(value: object, where: str) -> float:
    """A finite number, or a clear error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}.")
    return float(value)


def check_coefficients(values: Sequence[object], where: str) -> list[float]:
    """A non-empty list of finite numbers, or a clear error naming the setting."""
    if not values:
        raise ValueError(f"{where} is empty: give at least one coefficient, e.g. [0.1].")
    return [check_coefficient(v, where) for v in values]
