"""Mutual-information estimators against jointly Gaussian data with known canonical correlations."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from es_lightning.steering.mi import mi_matrix, mutual_information

N = 2000


def gaussian_pair(rhos: list[float], n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Samples a [n, k], b [n, k] with canonical correlations ``rhos`` (hidden by random rotations) and their MI."""
    rng = np.random.default_rng(seed)
    r = np.asarray(rhos)
    x = rng.standard_normal((n, len(r)))
    y = r * x + np.sqrt(1 - r**2) * rng.standard_normal((n, len(r)))
    rot_a = np.linalg.qr(rng.standard_normal((len(r), len(r))))[0]
    rot_b = np.linalg.qr(rng.standard_normal((len(r), len(r))))[0]
    return x @ rot_a, y @ rot_b, float(-0.5 * np.sum(np.log(1 - r**2)))


def well_conditioned(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, k)) + 3 * np.eye(k)


RHOS_5 = [0.9, 0.7, 0.5, 0.3, 0.1]


def test_gaussian_matches_analytic_mi() -> None:
    a, b, truth = gaussian_pair(RHOS_5)
    estimate = mutual_information(a, b, n_components=5)
    assert estimate == pytest.approx(truth, rel=0.05)


@pytest.mark.parametrize("side", ["a", "b"])
def test_gaussian_invariant_to_invertible_linear_maps(side: str) -> None:
    a, b, _ = gaussian_pair(RHOS_5, seed=1)
    base = mutual_information(a, b, n_components=5)
    mixed = (a @ well_conditioned(5, 7), b) if side == "a" else (a, b @ well_conditioned(5, 8))
    assert mutual_information(*mixed, n_components=5) == pytest.approx(base, rel=0.01)


def test_ledoit_wolf_shrinkage_only_lowers_the_estimate() -> None:
    a, b, _ = gaussian_pair(RHOS_5, seed=2)
    plain = mutual_information(a, b, n_components=5)
    shrunk = mutual_information(a, b, n_components=5, shrinkage="ledoit_wolf")
    assert 0 < shrunk < plain


@pytest.mark.parametrize("rhos", [[0.8], [0.8, 0.5]])
def test_ksg_matches_analytic_mi_in_low_dimension(rhos: list[float]) -> None:
    a, b, truth = gaussian_pair(rhos, seed=3)
    assert mutual_information(a, b, method="ksg", k=3) == pytest.approx(truth, rel=0.15)


@pytest.mark.parametrize("method", ["gaussian", "ksg"])
def test_independent_data_gives_near_zero(method: str) -> None:
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((N, 40)), rng.standard_normal((N, 30))
    assert 0 <= mutual_information(a, b, method=method) < 0.05


def test_accepts_torch_tensors_and_1d_inputs() -> None:
    a, b, _ = gaussian_pair([0.8], seed=5)
    from_numpy = mutual_information(a[:, 0], b[:, 0])
    from_torch = mutual_information(torch.from_numpy(a).float(), torch.from_numpy(b).to(torch.bfloat16))
    assert from_torch == pytest.approx(from_numpy, rel=0.02)


@pytest.mark.parametrize(
    ("method", "options"), [("gaussian", {"n_components": 3}), ("ksg", {"n_components": 2, "k": 4})]
)
def test_mi_matrix_matches_pairwise_calls(method: str, options: dict) -> None:
    rng = np.random.default_rng(6)
    n = 400
    shared = rng.standard_normal((n, 4))
    expert = np.stack(
        [shared @ rng.standard_normal((4, 12)) * s + rng.standard_normal((n, 12)) for s in (0.0, 0.5, 2.0)], 1
    )
    target = np.stack([shared @ rng.standard_normal((4, 9)) + rng.standard_normal((n, 9)) for _ in range(2)], 1)
    matrix = mi_matrix(torch.from_numpy(expert), target, method=method, **options)
    assert matrix.shape == (3, 2) and matrix.dtype == torch.float64
    for i in range(3):
        for j in range(2):
            single = mutual_information(expert[:, i], target[:, j], method=method, **options)
            assert matrix[i, j].item() == pytest.approx(single, abs=1e-12)
    assert (matrix[0] < matrix[1]).all() and (matrix[1] < matrix[2]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": np.zeros((10, 2)), "b": np.zeros((11, 2))}, "same number of paired samples"),
        ({"a": np.ones((50, 2)), "b": np.ones((50, 2)), "method": "kde"}, "method='gaussian' or method='ksg'"),
        ({"a": np.full((50, 2), np.nan), "b": np.ones((50, 2))}, "NaN or Inf"),
        ({"a": np.ones((9, 8)), "b": np.ones((9, 8))}, "pass more samples or a smaller n_components"),
        (
            {"a": np.ones((7, 1)), "b": np.ones((7, 1)), "method": "ksg"},
            "pass more samples or a smaller n_components / k",
        ),
        ({"a": np.ones((50, 2)), "b": np.ones((50, 2)), "method": "ksg", "shrinkage": 0.1}, "Unknown option"),
        ({"a": np.ones((50, 2)), "b": np.ones((50, 2)), "shrinkage": 1.5}, "shrinkage=0.0"),
        ({"a": np.ones((50, 2, 2)), "b": np.ones((50, 2))}, "shape [n, d]"),
        ({"a": np.ones((50, 2)), "b": np.random.default_rng(0).standard_normal((50, 2))}, "constant"),
    ],
)
def test_bad_input_raises_with_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        mutual_information(**kwargs)


def test_mi_matrix_needs_three_dimensional_states() -> None:
    with pytest.raises(ValueError, match="layers"):
        mi_matrix(np.ones((50, 4)), np.ones((50, 1, 4)))
