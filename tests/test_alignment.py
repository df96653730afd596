"""The alignment auto-encoder: closed-form seeding, batched maths, layer maps and bad input."""

import pytest
import torch

from es_lightning.alignment import AlignmentMaps
from es_lightning.alignment.layer_map import proportional_layer_map, validate_layer_map
from es_lightning.data.cache import PairedLayout
from es_lightning.models.spec import ModelInfo
from es_lightning.module import ExpertSteer


def layout(d_e=12, d_t=8, expert_layers=(0, 2, 3), target_layers=(1, 5)):
    return PairedLayout(
        ModelInfo("e", "/e", "fe", "gpt2", 4, d_e, tuple(expert_layers)),
        ModelInfo("t", "/t", "ft", "llama", 6, d_t, tuple(target_layers)),
        "last",
    )


def paired_data(n=400, d_e=12, d_t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert = torch.randn(n, 3, d_e, generator=g) * 3 + 1
    maps = torch.randn(3, d_t, d_e, generator=g)
    target_of_layer = torch.einsum("nld,ltd->nlt", expert, maps)
    target = torch.stack([target_of_layer[:, 0], target_of_layer[:, 2]], dim=1) + 0.01 * torch.randn(
        n, 2, d_t, generator=g
    )
    return expert, target


def built(objective="paired"):
    module = AlignmentMaps(objective=objective)
    lay = layout()
    module.build(lay, {0: 1, 2: 5, 3: 5})
    return module


def test_proportional_layer_map():
    assert proportional_layer_map([0, 9, 17], [0, 10, 20, 29], 18, 30) == {
        0: 0,
        9: 20,
        17: 29,
    }  # 9/17 of 29 blocks = 15.4 -> 20


def test_layer_map_errors_name_the_fix():
    with pytest.raises(ValueError, match="not captured"):
        validate_layer_map({0: 1, 2: 9, 3: 5}, [0, 2, 3], [1, 5])
    with pytest.raises(ValueError, match="is empty"):
        validate_layer_map({}, [0, 2, 3], [1, 5])
    assert validate_layer_map({2: 5}, [0, 2, 3], [1, 5]) == {2: 5}  # a subset: only layer 2 is trained


def test_unknown_objective():
    with pytest.raises(ValueError, match="Unknown objective"):
        AlignmentMaps(objective="contrastive")


def test_closed_form_paired_init_recovers_the_linear_map():
    module = built()
    expert, target = paired_data()
    module.fit_statistics_and_init(expert, target, ridge=1e-6)
    out = module.losses({"expert": expert, "target": target})
    assert out["pair"][0] < 1e-3  # expert layer 0 -> target layer 1 is exactly linear in the data
    assert out["recon"].max() < 0.36  # isotropic 12-d input through an 8-d code loses at most 4/12 of the variance
    cos = torch.nn.functional.cosine_similarity(out["code"][:, 0], out["paired_target"][:, 0], dim=-1)
    assert cos.mean() > 0.99


def test_reconstruction_init_is_pca():
    module = built(objective="reconstruction")
    g = torch.Generator().manual_seed(1)
    low_rank = torch.randn(300, 3, 6, generator=g) @ torch.randn(6, 12, generator=g)
    target = torch.randn(300, 2, 8, generator=g)
    module.fit_statistics_and_init(low_rank, target, ridge=1e-7)
    out = module.losses({"expert": low_rank, "target": target})
    assert "pair" not in out and out["recon"].max() < 1e-4  # rank 6 < d_T = 8: PCA reconstructs exactly


def test_batched_maths_equals_a_loop_over_layers():
    module = built()
    expert, target = paired_data(n=32)
    module.fit_statistics_and_init(expert, target)
    xs, _ = module.standardise(expert)
    code = module.encode(xs)
    for k in range(3):
        manual = xs[:, k] @ module.enc_weight[k].T + module.enc_bias[k]
        torch.testing.assert_close(code[:, k], manual)
        torch.testing.assert_close(module.decode(code)[:, k], manual @ module.dec_weight[k].T + module.dec_bias[k])


def test_statistics_are_scalar_per_layer_so_directions_survive():
    module = built()
    expert, target = paired_data()
    expert[:, 1] *= 5  # layer 2 (position 1) gets a scale of its own: each layer must be standardised on its own
    module.fit_statistics_and_init(expert, target)
    assert module.expert_scale.shape == (3,) and module.target_scale.shape == (2,)
    for states, mean, scale in (
        (expert, module.expert_mean, module.expert_scale),
        (target, module.target_mean, module.target_scale),
    ):
        for k in range(states.shape[1]):  # per-feature mean, one scale: the root mean square of the centred states
            centred = states[:, k] - states[:, k].mean(0)
            torch.testing.assert_close(mean[k], states[:, k].mean(0))
            torch.testing.assert_close(scale[k], centred.pow(2).mean().sqrt())
    assert float(module.expert_scale[0]) == pytest.approx(3.0, rel=0.05)  # paired_data's expert states: 3 N(0, 1) + 1
    assert float(module.expert_scale[1]) == pytest.approx(15.0, rel=0.05)
    xs, _ = module.standardise(expert)
    for k in range(3):  # a difference of two raw states keeps its direction, only its length shrinks by the scale
        raw, standardised = expert[1, k] - expert[0, k], xs[1, k] - xs[0, k]
        torch.testing.assert_close(standardised * module.expert_scale[k], raw, rtol=1e-4, atol=1e-5)
    # encoder_linear takes an absolute block index: block 2 is the second trained layer, not position 2
    torch.testing.assert_close(module.encoder_linear(2), module.enc_weight[1].detach())
    assert not torch.allclose(module.encoder_linear(2), module.encoder_linear(3))


def steering_module(lay: PairedLayout, layer_map: dict[int, int]) -> ExpertSteer:
    module = ExpertSteer()
    module.alignment.build(lay, layer_map)
    module.record = module.record.built(lay, layer_map, {"data": "k"})  # what setup records in a fit
    return module


@pytest.mark.parametrize("unprefixed", [False, True], ids=["current", "written-before-composition"])
def test_checkpoint_round_trip_without_trainer(unprefixed):
    module = steering_module(layout(), {0: 1, 2: 5, 3: 5})
    expert, target = paired_data()
    module.alignment.fit_statistics_and_init(expert, target)
    state = module.state_dict()
    assert state and all(name.startswith("alignment.") for name in state)  # the module holds the maps
    if unprefixed:  # a checkpoint of the module that inherited the auto-encoders: the same tensors at the top level
        state = {name.removeprefix("alignment."): value for name, value in state.items()}
    checkpoint = {"state_dict": state, "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    fresh = ExpertSteer()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.alignment.layer_map == {0: 1, 2: 5, 3: 5} and fresh.cache_keys == {"data": "k"}
    torch.testing.assert_close(fresh.alignment.encoder_linear(0), module.alignment.encoder_linear(0))
    other = steering_module(layout(expert_layers=(0, 1, 3)), {0: 1, 1: 1, 3: 5})
    with pytest.raises(ValueError, match="Fix: resume with the checkpoint's config"):
        other.on_load_checkpoint(checkpoint)


def test_encoder_linear_is_the_encoders_change_along_a_direction_without_its_bias():
    """Mapped directions are W v: the step f(x + v) - f(x) of the encoder, whatever its bias b (not W v + b)."""
    module = built()
    expert, target = paired_data()
    module.init_from_layers(lambda i: expert[:, [0, 2, 3].index(i)], lambda j: target[:, [1, 5].index(j)])
    g = torch.Generator().manual_seed(4)
    module.enc_bias.data = 5.0 * torch.randn(module.enc_bias.shape, generator=g)
    xs, _ = module.standardise(expert)
    v = torch.randn(12, generator=g)
    step = module.encode(xs + v) - module.encode(xs)
    for k, i in enumerate(module.trained_layers):
        mapped = module.encoder_linear(i) @ v
        torch.testing.assert_close(step[:, k], mapped.expand_as(step[:, k]), atol=1e-3, rtol=1e-4)
        assert (mapped - step[0, k]).norm() < 1e-3 * mapped.norm()
