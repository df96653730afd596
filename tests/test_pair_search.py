"""The layer-pair search finds pairs the depth map would not, on synthetic states whose true pairs are known."""

from __future__ import annotations

import pytest
import torch

from es_lightning.steering.mi import MISettings
from es_lightning.steering.pair_search import PairSearch, PairSearchConfig, search_pairs
from es_lightning.steering.pairing import PairingRule, depth_pairs
from es_lightning.steering.rows import PairedRows, split_by_group

TRUE_PARTNER = {0: 7, 1: 5, 2: 2, 3: 0}  # expert layer -> target layer; the depth map says 0->0, 1->2, 2->5, 3->7


def synthetic_rows(n: int = 600, signal_layer: int | None = None, seed: int = 0) -> PairedRows:
    """Target: 8 independent layers (width 12). Expert: 4 layers (width 10), layer i a noisy linear image of target
    layer TRUE_PARTNER[i]. Labels shift ``signal_layer`` of the target (if given) along a fixed direction."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2).long()
    target = torch.randn(n, 8, 12, generator=g)
    if signal_layer is not None:
        target[:, signal_layer] += 1.5 * labels[:, None].float() * torch.randn(12, generator=g)
    expert = torch.empty(n, 4, 10)
    for i, j in TRUE_PARTNER.items():
        expert[:, i] = target[:, j] @ torch.randn(12, 10, generator=g) + 0.5 * torch.randn(n, 10, generator=g)
    groups = [f"q{r // 2}" for r in range(n)]  # two rows (one per label) per question
    return PairedRows(expert, target, labels, groups)


def run(rows: PairedRows, **options):
    kept, held = split_by_group(rows.groups, 0.3, seed=0)
    config = PairSearchConfig(**{"rule": "highest", "top_k": 4, "max_components": 16, **options})
    return search_pairs(rows.take(kept), rows.take(held), [0, 1, 2, 3], list(range(8)), 4, 8, config)


def test_highest_mi_finds_the_true_pairs_and_depth_does_not():
    rows = synthetic_rows()
    found = run(rows, rule="highest").result
    assert sorted(found.pairs) == sorted(TRUE_PARTNER.items())
    depth = run(rows, rule="depth").result
    assert not set(depth.pairs) & set(TRUE_PARTNER.items())
    assert depth.pairs == found.depth_pairs


def test_lowest_mi_avoids_the_true_pairs():
    found = run(synthetic_rows(), rule="lowest").result
    assert not set(found.pairs) & set(TRUE_PARTNER.items())


def test_mi_is_measured_on_held_out_rows_and_peaks_at_true_pairs():
    found = run(synthetic_rows(), rule="highest").result
    mi = torch.tensor(found.mi)
    for i, j in TRUE_PARTNER.items():
        assert mi[i].argmax().item() == j
    assert found.n_heldout == 180 and found.n_fit == 420


def test_separability_picks_the_layer_pair_that_carries_the_labels():
    found = run(synthetic_rows(signal_layer=5), rule="separability", top_k=1).result
    assert found.pairs == [(1, 5)]
    assert found.auc[1][5] > 0.8


def test_ridge_is_chosen_by_grouped_cross_validation():
    found = run(synthetic_rows(n=200), rule="highest").result
    assert found.ridge in PairSearchConfig().ridges
    assert set(found.ridge_scores) == {f"{r:g}" for r in PairSearchConfig().ridges}
    assert min(found.ridge_scores, key=found.ridge_scores.get) == f"{found.ridge:g}"


def test_chosen_map_carries_directions_between_the_true_layers():
    rows = synthetic_rows(signal_layer=7)
    outcome = run(rows, rule="highest")
    linear = outcome.linear[0]  # expert 0 -> target 7
    assert linear.shape == (12, 10)
    labels = rows.labels.bool()
    expert, target = rows.expert.layer(0), rows.target.layer(7)
    expert_direction = expert[labels].mean(0) - expert[~labels].mean(0)
    target_direction = target[labels].mean(0) - target[~labels].mean(0)
    assert torch.nn.functional.cosine_similarity(linear @ expert_direction, target_direction, dim=0) > 0.8


def test_reconstruction_objective_scores_codes_on_held_out_rows():
    fit, held = _split(synthetic_rows())
    recon = search_pairs(
        fit,
        held,
        [0, 1, 2, 3],
        list(range(8)),
        4,
        8,
        PairSearchConfig(rule="highest", top_k=2, max_components=16),
        objective="reconstruction",
    )
    result = recon.result
    assert result.ridge is None and result.ridge_scores == {} and result.objective == "reconstruction"
    assert (result.n_fit, result.n_heldout) == (420, 180)
    mi = torch.tensor(result.mi)
    for i, j in TRUE_PARTNER.items():  # the code is a rotation of expert layer i, so it still peaks at its partner
        assert mi[i].argmax().item() == j
    assert len(result.pairs) == 2 and set(result.pairs) <= set(TRUE_PARTNER.items())
    for i, _ in result.pairs:
        # the code: expert layer i's principal directions on the fit rows, by variance, then zero rows (d_T > d_E)
        code = recon.linear[i].double()
        assert code.shape == (12, 10) and torch.equal(code[10:], torch.zeros(2, 10, dtype=torch.float64))
        expert = fit.expert.layer(i).double()
        _, _, principal = torch.linalg.svd(expert - expert.mean(0), full_matrices=False)
        alignment = (code[:10] @ principal.T).abs()  # identity up to the sign of each direction
        torch.testing.assert_close(alignment, torch.eye(10, dtype=torch.float64), atol=1e-4, rtol=0)
    paired = run(synthetic_rows(), rule="highest", top_k=2)
    assert paired.result.objective == "paired" and paired.result.ridge is not None


def _split(rows):
    kept, held = split_by_group(rows.groups, 0.3, seed=0)
    return rows.take(kept), rows.take(held)


def test_result_round_trips_through_json():
    found = run(synthetic_rows(n=200), rule="highest").result
    assert PairSearch.from_dict(found.to_dict()) == found


def test_depth_rule_spreads_expert_layers_over_the_middle():
    pairs = depth_pairs(list(range(18)), list(range(30)), 18, 30, PairingRule("depth", 3))
    assert pairs == [(7, 12), (8, 14), (10, 17)]  # relative depths 0.43, 0.5, 0.57 of the expert, same of the target


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rule": "median"}, "Unknown pairing rule"),
        ({"top_k": 9}, "top_k=9"),
        ({"heldout_fraction": 1.5}, "heldout_fraction"),
        ({"ridges": []}, "ridges"),
        ({"mi_options": MISettings(k=5)}, r"Unknown option\(s\) \['k'\] for method='gaussian'"),
        ({"mi_options": MISettings(n_components=0)}, "n_components must be a positive integer"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        run(synthetic_rows(n=60), **options)


def test_too_few_held_out_rows_for_the_estimator():
    rows = synthetic_rows(n=60)
    kept, held = split_by_group(rows.groups, 0.1, seed=0)
    with pytest.raises(ValueError, match="held-out rows"):
        search_pairs(
            rows.take(kept),
            rows.take(held),
            [0, 1, 2, 3],
            list(range(8)),
            4,
            8,
            PairSearchConfig(rule="highest", top_k=2),
        )


def test_fit_and_held_out_rows_must_not_share_questions():
    rows = synthetic_rows(n=100)
    with pytest.raises(ValueError, match="share questions"):
        search_pairs(rows, rows, [0, 1, 2, 3], list(range(8)), 4, 8, PairSearchConfig(top_k=2))
