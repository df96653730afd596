"""One place for the steering options every config shares: method names, coefficients, where a vector applies,
and the RFM's settings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

Method = Literal["expertsteer", "rfm_self", "mean_difference", "random"]
METHODS: tuple[Method, ...] = get_args(Method)
Positions = Literal["all", "prompt", "generated"]  # which token positions a vector is added at (see steering.hooks)


@dataclass
class RFMOptions:
    """The Recursive Feature Machine's settings (``model.vectors.rfm_options``), the same for the fit's bundles and
    every evaluation fold; the defaults are :func:`es_lightning.steering.rfm.fit_rfm`'s (a test keeps them equal)."""

    iters: int = 3
    """AGOP updates of the feature matrix M, starting from M = I."""
    bandwidths: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """Laplace-kernel bandwidths to try, as multiples of the median pairwise distance."""
    regs: list[float] = field(default_factory=lambda: [1e-3, 1e-1, 1.0])
    """Kernel ridge values to try (the kernel matrix has unit diagonal)."""
    val_fraction: float = 0.2
    """Share of the rows (whole questions) that scores each (bandwidth, ridge) pair."""
    grid_max_train: int = 1000
    """Rows the grid fits on at most; the chosen pair is refitted on all training rows."""
    standardize: bool = True
    """Standardise features before fitting; the direction is returned in the original coordinates."""
    device: str | None = None
    """Where the kernels live; null: the trainer's device."""
    max_rows: int | None = 10_000
    """Rows fitted at most (whole questions, seeded); caps the n x n kernel's memory. null: no cap."""

    @classmethod
    def of(cls, value: RFMOptions | Mapping[str, Any] | None, where: str = "vectors.rfm_options") -> RFMOptions:
        """``value`` as options: itself, or a mapping of some fields (unknown names refused, naming them)."""
        if value is None or isinstance(value, RFMOptions):
            return value or cls()
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown {where} {unknown}: use some of {[f.name for f in fields(cls)]}.")
        return cls(**value)

    def fit_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~es_lightning.steering.rfm.fit_rfm` (``device`` left to the caller)."""
        options = asdict(self)
        options.pop("device")
        return options


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
