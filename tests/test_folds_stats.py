"""Cross-validation folds, exact sign tests, spread over folds and the verdict rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from es_lightning.data.folds import Fold, make_folds
from es_lightning.evaluation.stats import RandomControl, SignTest, random_control, sign_test, summarise, verdict


def check_partition(folds: list[Fold], n: int) -> None:
    """Every question is tested exactly once; in each fold train/val/test are disjoint and cover everything."""
    tested = sorted(q for fold in folds for q in fold.test)
    assert tested == list(range(n))
    for fold in folds:
        parts = [set(fold.train), set(fold.val), set(fold.test)]
        assert all(parts), "no part may be empty"
        assert sum(len(p) for p in parts) == n and set().union(*parts) == set(range(n))


def is_cyclic_block(indices: tuple[int, ...], n: int) -> bool:
    """Whether ``indices`` are adjacent rows, allowing a wrap from the last row to the first."""
    members = set(indices)
    starts = [q for q in indices if (q - 1) % n not in members]
    return len(starts) == 1


@pytest.mark.parametrize("mode", ["random", "contiguous"])
def test_folds_partition_questions(mode):
    folds = make_folds(23, k=5, mode=mode, seed=3)
    check_partition(folds, 23)
    assert [len(f.test) for f in folds] == [5, 5, 5, 4, 4]
    for fold in folds:
        non_test = len(fold.train) + len(fold.val)
        assert len(fold.val) == round(0.25 * non_test)


def test_random_folds_are_seeded():
    assert make_folds(30, k=3, seed=1) == make_folds(30, k=3, seed=1)
    assert make_folds(30, k=3, seed=1) != make_folds(30, k=3, seed=2)
    ids = [f"q{i}" for i in range(30)]
    assert make_folds(ids, k=3, seed=1) == make_folds(30, k=3, seed=1)


def test_group_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    groups = [f"topic{int(g)}" for g in rng.integers(0, 12, size=60)]
    folds = make_folds(60, k=4, mode="group", groups=groups, seed=0, val_fraction=0.3)
    check_partition(folds, 60)
    for fold in folds:
        owner = {}
        for part, indices in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
            for q in indices:
                assert owner.setdefault(groups[q], part) == part, (
                    f"group {groups[q]} straddles {owner[groups[q]]}/{part}"
                )


def test_contiguous_folds_keep_blocks():
    n = 20
    folds = make_folds(n, k=4, mode="contiguous", val_fraction=0.25)
    check_partition(folds, n)
    assert [f.test for f in folds] == [tuple(range(s, s + 5)) for s in range(0, 20, 5)]
    for fold in folds:
        assert is_cyclic_block(fold.val, n) and is_cyclic_block(fold.train, n)
    # The validation block sits right after the test block (cyclically).
    assert folds[0].val == (5, 6, 7, 8) and folds[3].val == (0, 1, 2, 3)
    # With an even block size, adjacent pairs (2i, 2i+1) always share a test block.
    for fold in make_folds(n, k=5, mode="contiguous"):
        assert all((q ^ 1) in fold.test for q in fold.test)


def test_fold_round_trip():
    fold = make_folds(10, k=2)[0]
    assert Fold.from_dict(fold.to_dict()) == fold


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(questions=10, k=1), "at least 2"),
        (dict(questions=3, k=4), "at least 4 questions"),
        (dict(questions=10, k=2, mode="group", groups=["a"] * 5 + ["b"] * 5), "too few for both"),
        (dict(questions=10, k=3, mode="group", groups=["a"] * 5 + ["b"] * 5), "at least 3 groups"),
        (dict(questions=10, k=2, mode="group"), "needs groups"),
        (dict(questions=10, k=2, mode="group", groups=["a"] * 9), "one per question"),
        (dict(questions=10, k=2, groups=["a"] * 10), "only used with mode='group'"),
        (dict(questions=10, k=2, mode="stratified"), "Unknown fold mode"),
        (dict(questions=10, k=2, val_fraction=0.0), "strictly between"),
        (dict(questions=["a", "b", "a", "c"], k=2), "must be unique"),
        (dict(questions=0, k=2), "must be positive"),
    ],
)
def test_fold_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_folds(**kwargs)


def pairs(wins: int, losses: int, ties: int) -> tuple[list[bool], list[bool]]:
    """Correctness arrays with the given numbers of wins, losses and ties (ties split between both-right and
    both-wrong)."""
    a = [True] * wins + [False] * losses + [True] * (ties // 2) + [False] * (ties - ties // 2)
    b = [False] * wins + [True] * losses + [True] * (ties // 2) + [False] * (ties - ties // 2)
    return a, b


@pytest.mark.parametrize(
    ("wins", "losses", "ties", "p"),
    [
        (8, 2, 5, 2 * (1 + 10 + 45) / 1024),  # 2 * P(X <= 2), X ~ Bin(10, 1/2)
        (9, 1, 0, 2 * (1 + 10) / 1024),
        (1, 9, 3, 2 * (1 + 10) / 1024),
        (6, 0, 1, 2 / 64),
        (5, 0, 0, 2 / 32),
        (3, 3, 4, 1.0),
        (0, 0, 7, 1.0),  # no discordant pairs
    ],
)
def test_sign_test_matches_hand_computed_p(wins, losses, ties, p):
    a, b = pairs(wins, losses, ties)
    result = sign_test(a, b)
    assert (result.wins, result.losses, result.ties) == (wins, losses, ties)
    assert result.p_value == pytest.approx(p, rel=1e-12)
    assert sign_test(np.array(a, dtype=int), b) == result  # 0/1 arrays work too


def test_sign_test_errors():
    with pytest.raises(ValueError, match="same questions"):
        sign_test([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        sign_test([0, 2], [1, 1])


def test_summarise():
    spread = summarise([0.5, 0.6, 0.7])
    assert spread.mean == pytest.approx(0.6)
    assert spread.std == pytest.approx(0.1)
    assert spread.sem == pytest.approx(0.1 / math.sqrt(3))
    assert (spread.min, spread.max, spread.n) == (0.5, 0.7, 3)
    assert summarise([0.4]).std == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        summarise([])


def test_verdict_needs_both_baselines():
    strong = SignTest(9, 1, 0, 2 * 11 / 1024)  # p = 0.0215
    weak = SignTest(5, 0, 0, 0.0625)
    beats_draws = RandomControl(0.8, 0.5, (0.5, 0.5), 1.0, 0.01, 20, 1000)
    within_draws = RandomControl(0.55, 0.5, (0.4, 0.6), 0.5, 0.4, 20, 1000)
    below_draws = RandomControl(0.45, 0.5, (0.4, 0.6), 0.5, 0.01, 20, 1000)
    assert verdict(strong, beats_draws) == "gain"
    assert verdict(strong, within_draws) == "no gain"  # beats no steering but not the random control
    assert verdict(strong, below_draws) == "no gain"  # significant, but in the wrong direction
    assert verdict(weak, beats_draws) == "no gain"
    assert verdict(strong, beats_draws, alpha=0.005) == "no gain"
    assert verdict(SignTest(1, 9, 0, 2 * 11 / 1024), beats_draws) == "worse"
    with pytest.raises(ValueError, match="alpha"):
        verdict(strong, beats_draws, alpha=1.5)


def test_random_control_distribution_test():
    rng = np.random.default_rng(0)
    draws = rng.random((8, 200)) < 0.3
    same = random_control(draws[0], draws, permutations=2000)
    assert same.p_value > 0.05 and 0 <= same.percentile <= 1
    better = random_control(rng.random(200) < 0.6, draws, permutations=2000)
    assert better.p_value < 0.001 and better.percentile == 1.0 and better.better
    assert better.draw_accuracies == pytest.approx(tuple(draws.mean(1)))
    assert better.mean_accuracy == pytest.approx(draws.mean())
    with pytest.raises(ValueError, match="draws must be"):
        random_control(draws[0], draws[:, :10])


def test_permutation_p_value_counts_the_observed_arrangement():
    """p = (exceedances + 1) / (permutations + 1): never 0, and exactly 1 when the method equals the draws."""
    draws = np.zeros((3, 40), dtype=bool)
    always_right = random_control(np.ones(40, dtype=bool), draws, permutations=500)
    assert always_right.p_value == 1 / 501  # 40 equal differences: only all-equal signs reach the observed mean
    assert random_control(draws[0], draws, permutations=500).p_value == 1.0  # zero difference: every flip reaches it
