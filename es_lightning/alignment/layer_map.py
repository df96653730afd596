"""Which target layer each expert layer is paired with while training the auto-encoders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def proportional_layer_map(
    expert_layers: Sequence[int], target_layers: Sequence[int], expert_depth: int, target_depth: int
) -> dict[int, int]:
    """Map each expert layer to the captured target layer at the nearest relative depth."""
    out = {}
    for layer in expert_layers:
        relative = layer / max(expert_depth - 1, 1)
        wanted = relative * (target_depth - 1)
        out[layer] = min(target_layers, key=lambda t: (abs(t - wanted), t))
    return out


def validate_layer_map(
    layer_map: Mapping[int, int], expert_layers: Sequence[int], target_layers: Sequence[int]
) -> dict[int, int]:
    """Check an expert->target mapping against the captured layers: the expert layers it names are the ones trained."""
    layer_map = {int(k): int(v) for k, v in layer_map.items()}
    if not layer_map:
        raise ValueError(
            "layer_map is empty: map at least one captured expert layer to a captured target layer, or set it to null."
        )
    unknown = sorted(set(layer_map) - set(expert_layers))
    bad_targets = sorted({v for v in layer_map.values() if v not in target_layers})
    if unknown or bad_targets:
        raise ValueError(
            "layer_map does not fit the cached layers: "
            + "; ".join(
                part
                for part in (
                    f"expert layers {unknown} are not captured (captured: {list(expert_layers)})" if unknown else "",
                    f"target layers {bad_targets} are not captured (captured: {list(target_layers)})"
                    if bad_targets
                    else "",
                )
                if part
            )
            + ". Fix: map captured expert layers to captured target layers, or set layer_map: null (the layer-pair "
            "search, or the proportional-depth map without it)."
        )
    return layer_map
