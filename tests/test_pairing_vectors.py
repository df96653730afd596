"""Layer pairing from an MI matrix and the four steering-vector methods."""

import pytest
import torch

from es_lightning.steering.pairing import PairingRule, select_pairs
from es_lightning.steering.vectors import VectorInputs, compute_vectors, layer_norms

MI = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])  # expert layers [2, 5] x target layers [1, 4, 7]


def test_lowest_and_highest_rules():
    assert select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("lowest", top_k=2)) == [(5, 1), (2, 4)]
    assert select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("highest", top_k=2)) == [(2, 1), (5, 4)]


def test_one_target_per_expert_off_allows_an_expert_layer_twice_but_never_a_target():
    pairs = select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("lowest", top_k=3, one_target_per_expert=False))
    assert pairs == [(5, 1), (2, 4), (5, 7)]
    assert len({t for _, t in pairs}) == 3


def test_depth_window_restricts_target_layers():
    pairs = select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("lowest", top_k=3, depth_window=(0.5, 1.0)))
    assert {t for _, t in pairs} == {4, 7}
    with pytest.raises(ValueError, match="depth_window"):
        select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("lowest", depth_window=(0.9, 0.95)))


def test_pairing_errors():
    with pytest.raises(ValueError, match="Unknown pairing rule"):
        select_pairs(MI, [2, 5], [1, 4, 7], 8, PairingRule("middle"))
    with pytest.raises(ValueError, match="does not match"):
        select_pairs(MI, [2], [1, 4, 7], 8, PairingRule("highest"))


def planted(n=600, d_e=24, d_t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d_e, generator=g), dim=0)
    expert = torch.randn(n, 2, d_e, generator=g)
    labels = (expert[:, 1] @ u > 0).long()
    expert[:, 1] += 1.5 * (2 * labels[:, None] - 1) * u  # a clean margin along u
    mapping = torch.randn(d_t, d_e, generator=g)
    target = torch.stack([expert[:, 0] @ mapping.T, expert[:, 1] @ mapping.T], 1)
    inputs = VectorInputs(
        expert,
        target,
        labels,
        [3, 6],
        [10, 20],
        encoder_linear=lambda i: mapping,
        rfm_options={"iters": 2, "bandwidths": [1.0], "regs": [0.1]},
        seed=0,
    )
    return inputs, u, mapping


def test_expertsteer_maps_the_expert_direction_through_the_encoder():
    inputs, u, mapping = planted()
    result = compute_vectors("expertsteer", [(6, 20)], inputs)
    expected = torch.nn.functional.normalize(mapping @ u, dim=0)
    assert torch.dot(result.vectors[20], expected) > 0.9
    assert abs(result.vectors[20].norm() - 1) < 1e-5 and result.diagnostics[20]["expert_layer"] == 6


def test_mean_difference_and_rfm_self_point_the_same_way():
    inputs, _, _ = planted()
    md = compute_vectors("mean_difference", [(6, 20)], inputs).vectors[20]
    target = inputs.target[:, 1]
    expected = torch.nn.functional.normalize(
        target[inputs.labels == 1].mean(0) - target[inputs.labels == 0].mean(0), dim=0
    )
    torch.testing.assert_close(md, expected)
    rfm = compute_vectors("rfm_self", [(6, 20)], inputs).vectors[20]
    assert torch.dot(rfm, md) > 0  # both oriented towards label 1


def test_random_vectors_are_seeded_unit_vectors():
    inputs, _, _ = planted()
    a = compute_vectors("random", [(3, 10), (6, 20)], inputs).vectors
    b = compute_vectors("random", [(3, 10), (6, 20)], inputs).vectors
    assert all(torch.equal(a[j], b[j]) and abs(a[j].norm() - 1) < 1e-6 for j in a)


def test_vector_errors_come_before_any_fitting():
    inputs, _, _ = planted()
    with pytest.raises(ValueError, match="Unknown steering-vector method"):
        compute_vectors("pca", [(6, 20)], inputs)
    one_class = VectorInputs(inputs.expert, inputs.target, torch.ones_like(inputs.labels), [3, 6], [10, 20])
    with pytest.raises(ValueError, match="labels 0 and 1"):
        compute_vectors("mean_difference", [(6, 20)], one_class)
    broken = inputs.expert.clone()
    broken[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf at cached layer positions \\[1\\]"):
        compute_vectors(
            "mean_difference", [(6, 20)], VectorInputs(broken, inputs.target, inputs.labels, [3, 6], [10, 20])
        )
    wrong = VectorInputs(
        inputs.expert,
        inputs.target,
        inputs.labels,
        [3, 6],
        [10, 20],
        encoder_linear=lambda i: torch.zeros(16, 5),
        rfm_options=inputs.rfm_options,
    )
    with pytest.raises(ValueError, match="expects width 5"):
        compute_vectors("expertsteer", [(6, 20)], wrong)


def test_layer_norms_are_mean_state_norms():
    inputs, _, _ = planted()
    norms = layer_norms(inputs.target, [10, 20], [20])
    assert norms == {20: pytest.approx(float(inputs.target[:, 1].norm(dim=-1).mean()))}


def test_expertsteer_applies_an_equal_width_map_untransposed():
    """With d_E == d_T a transposed map has the right shape, so only the values can tell: mapping @ u, not
    mapping.T @ u."""
    g = torch.Generator().manual_seed(3)
    n, d = 600, 12
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    expert = torch.randn(n, 1, d, generator=g)
    labels = (expert[:, 0] @ u > 0).long()
    expert[:, 0] += 1.5 * (2 * labels[:, None] - 1) * u
    mapping = torch.triu(torch.randn(d, d, generator=g)) + 3 * torch.eye(d)  # far from symmetric
    inputs = VectorInputs(
        expert,
        expert @ mapping.T,
        labels,
        [0],
        [0],
        encoder_linear=lambda i: mapping,
        rfm_options={"iters": 2, "bandwidths": [1.0], "regs": [0.1]},
        seed=0,
    )
    vector = compute_vectors("expertsteer", [(0, 0)], inputs).vectors[0]
    right = torch.nn.functional.normalize(mapping @ u, dim=0)
    wrong = torch.nn.functional.normalize(mapping.T @ u, dim=0)
    assert torch.dot(vector, right) > 0.95
    assert torch.dot(vector, right) - torch.dot(vector, wrong) > 0.2


def test_rfm_options_are_fit_rfms_defaults_and_refuse_unknown_names():
    import inspect
    from dataclasses import fields

    from es_lightning.steering.options import RFMOptions
    from es_lightning.steering.rfm import fit_rfm
    from es_lightning.steering.vectors import VectorConfig

    signature = inspect.signature(fit_rfm).parameters
    for option in fields(RFMOptions):
        default = getattr(RFMOptions(), option.name)
        expected = signature[option.name].default
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, option.name
    assert VectorConfig(rfm_options={"iters": 1}).rfm_options == RFMOptions(iters=1)
    with pytest.raises(ValueError, match=r"Unknown vectors.rfm_options \['iter'\]"):
        VectorConfig(rfm_options={"iter": 1})
