"""Step 1 of ExpertSteer, the model: per trained expert layer, an affine auto-encoder between expert and target widths,
as a plain ``nn.Module`` that the steering LightningModule holds (:class:`es_lightning.module.ExpertSteer`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import nn

from es_lightning.alignment.closed_form import seed_weights, statistics
from es_lightning.alignment.metrics import AlignmentMetrics
from es_lightning.data.cache import PairedLayout

Objective = Literal["reconstruction", "paired"]  # paired: ours, the default; reconstruction: the paper's
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DEFAULT_RIDGE = 1e-2  # the closed-form seed's ridge when neither the config nor the pair search gives one


class AlignmentMaps(nn.Module):
    """For each trained expert layer i: encoder f_i: R^{d_E}->R^{d_T} and decoder g_i: R^{d_T}->R^{d_E}.

    Inputs are standardised per layer (per-feature mean, one scalar scale, from the train split only; a scalar scale
    keeps directions intact). Objectives: ``reconstruction`` (the paper as reported: ||h_E - g(f(h_E))||^2) and
    ``paired`` (ours, default: reconstruction + ``pair_weight`` * ||f(h_E,i) - h_T,j(i)||^2 on standardised target
    states). All layers run in one batched einsum. :meth:`build` creates the parameters for a cache layout and a
    layer map (expert layer -> target block); :meth:`init_from_layers` sets the statistics and the closed-form seed.
    """

    # parameters and buffers, created by build() for a layout
    enc_weight: nn.Parameter  # [L_E, d_T, d_E]
    enc_bias: nn.Parameter  # [L_E, d_T]
    dec_weight: nn.Parameter  # [L_E, d_E, d_T]
    dec_bias: nn.Parameter  # [L_E, d_E]
    expert_index: torch.Tensor  # position of each trained layer among the cached expert layers
    expert_mean: torch.Tensor  # [L_E, d_E] standardisation, train split
    expert_scale: torch.Tensor  # [L_E]
    target_mean: torch.Tensor  # [L_T cached, d_T]
    target_scale: torch.Tensor  # [L_T cached]
    paired_index: torch.Tensor  # position of each trained layer's target layer among the cached target layers
    metrics: AlignmentMetrics

    def __init__(self, objective: Objective = "paired", pair_weight: float = 1.0):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(
                f"Unknown objective {objective!r}: use one of {list(OBJECTIVES)} ('paired' is the default)."
            )
        if pair_weight < 0:
            raise ValueError(f"pair_weight must be >= 0, got {pair_weight}.")
        self.objective = objective
        self.pair_weight = pair_weight
        self.layout: PairedLayout | None = None
        self.layer_map: dict[int, int] = {}
        self.trained_layers: list[int] = []  # the expert layers with an auto-encoder, once built

    # ------------------------------------------------------------------------------- structure
    @property
    def is_built(self) -> bool:
        return self.layout is not None

    @property
    def built_layout(self) -> PairedLayout:
        """The cache layout the parameters were built for (an error before :meth:`build`)."""
        if self.layout is None:
            raise RuntimeError("The auto-encoders are not built yet: fit them, or load a checkpoint.")
        return self.layout

    def build(self, layout: PairedLayout, layer_map: dict[int, int]) -> None:
        """Create parameters, buffers and metrics for ``layout`` (idempotent for the same layout)."""
        if self.layout is not None:
            if self.layout != layout:
                raise ValueError(
                    "This auto-encoder was built for another cache layout (models or layers) than the data module's. "
                    "Fix: use the config the checkpoint was trained with, or start a new run."
                )
            return
        trained = sorted(layer_map)
        n_layers, d_e, d_t = len(trained), layout.expert.hidden_size, layout.target.hidden_size
        self.layout, self.layer_map, self.trained_layers = layout, dict(layer_map), trained
        expert_pos = {layer: k for k, layer in enumerate(layout.expert.layers)}
        self.register_buffer("expert_index", torch.tensor([expert_pos[i] for i in trained], dtype=torch.long))
        self.enc_weight = nn.Parameter(torch.zeros(n_layers, d_t, d_e))
        self.enc_bias = nn.Parameter(torch.zeros(n_layers, d_t))
        self.dec_weight = nn.Parameter(torch.zeros(n_layers, d_e, d_t))
        self.dec_bias = nn.Parameter(torch.zeros(n_layers, d_e))
        self.register_buffer("expert_mean", torch.zeros(n_layers, d_e))
        self.register_buffer("expert_scale", torch.ones(n_layers))
        n_target = len(layout.target.layers)
        self.register_buffer("target_mean", torch.zeros(n_target, layout.target.hidden_size))
        self.register_buffer("target_scale", torch.ones(n_target))
        target_pos = {layer: k for k, layer in enumerate(layout.target.layers)}
        self.register_buffer(
            "paired_index", torch.tensor([target_pos[layer_map[i]] for i in trained], dtype=torch.long)
        )
        self.metrics = AlignmentMetrics(n_layers, paired=self.objective == "paired")

    # ----------------------------------------------------------------------------------- maths
    @property
    def batch_layers(self) -> tuple[list[int], list[int]] | None:
        """The block indices a training or validation batch needs: the trained expert layers and, for the paired
        objective, their target layers (None before :meth:`build`). The data module's loaders read only these."""
        if not self.is_built:
            return None
        targets = sorted(set(self.layer_map.values())) if self.objective == "paired" else []
        return list(self.trained_layers), targets

    def standardise(
        self, expert: torch.Tensor, target: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standardise raw cached states with the train-split statistics.

        ``expert`` ``[B, L, d_E]`` holds every cached expert layer or only the trained ones; ``target`` every cached
        target layer or only the target layers of :attr:`batch_layers` (both in block order). Returns the trained
        expert layers and the target layers as given."""
        if expert.shape[1] not in (len(self.trained_layers), len(self.built_layout.expert.layers)):
            raise ValueError(
                f"Expert states hold {expert.shape[1]} layers: expected every cached expert layer "
                f"({len(self.built_layout.expert.layers)}) or the trained ones {self.trained_layers}."
            )
        if expert.shape[1] != len(self.trained_layers):
            expert = expert[:, self.expert_index]
        xs = (expert - self.expert_mean) / self.expert_scale[:, None]
        if target is None:
            return xs, None
        positions = self._target_positions(target.shape[1])
        return xs, (target - self.target_mean[positions]) / self.target_scale[positions, None]

    def _target_positions(self, count: int) -> list[int]:
        """Positions among the cached target layers of a target tensor with ``count`` layers (:meth:`standardise`)."""
        cached = list(self.built_layout.target.layers)
        if count == len(cached):
            return list(range(count))
        served = sorted(set(self.layer_map.values())) if self.objective == "paired" else []
        if count != len(served):
            raise ValueError(
                f"Target states hold {count} layers: expected every cached target layer ({len(cached)}) or "
                f"the paired ones {served}."
            )
        return [cached.index(j) for j in served]

    def encode(self, expert_std: torch.Tensor) -> torch.Tensor:
        """f_i for all layers at once: ``[B, L_E, d_E] -> [B, L_E, d_T]`` (standardised spaces)."""
        return torch.einsum("bld,ltd->blt", expert_std, self.enc_weight) + self.enc_bias

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """g_i for all layers at once: ``[B, L_E, d_T] -> [B, L_E, d_E]``."""
        return torch.einsum("blt,ldt->bld", code, self.dec_weight) + self.dec_bias

    def encoder_linear(self, expert_layer: int) -> torch.Tensor:
        """The linear part ``[d_T, d_E]`` of f_i for an expert layer (absolute block index); maps directions."""
        if expert_layer not in self.trained_layers:
            raise ValueError(f"Expert layer {expert_layer} has no trained encoder (trained: {self.trained_layers}).")
        return self.enc_weight[self.trained_layers.index(expert_layer)].detach()

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-layer reconstruction and pairing losses ``[L_E]`` plus the scalar total."""
        xs, ys = self.standardise(batch["expert"], batch["target"])
        code = self.encode(xs)
        recon = self.decode(code)
        out = {"recon": (recon - xs).pow(2).mean(dim=(0, 2)), "code": code, "recon_x": recon, "xs": xs}
        total = out["recon"].mean()
        if self.objective == "paired":
            positions = self._target_positions(batch["target"].shape[1])
            assert ys is not None  # the batch's target states were standardised with the expert's
            paired_target = ys[:, [positions.index(int(b)) for b in self.paired_index]]
            out["pair"] = (code - paired_target).pow(2).mean(dim=(0, 2))
            out["paired_target"] = paired_target
            total = total + self.pair_weight * out["pair"].mean()
        out["total"] = total
        return out

    # ---------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def fit_statistics_and_init(self, expert: torch.Tensor, target: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> None:
        """Standardisation statistics and the closed-form seed from in-memory train states ``[n, L_cached, d]``."""
        expert_pos = {layer: k for k, layer in enumerate(self.built_layout.expert.layers)}
        target_pos = {layer: k for k, layer in enumerate(self.built_layout.target.layers)}
        self.init_from_layers(lambda i: expert[:, expert_pos[i]], lambda j: target[:, target_pos[j]], ridge)

    @torch.no_grad()
    def init_from_layers(
        self,
        expert_layer: Callable[[int], torch.Tensor],
        target_layer: Callable[[int], torch.Tensor],
        ridge: float = DEFAULT_RIDGE,
        closed_form: bool = True,
    ) -> None:
        """Standardisation statistics from the train split, then the closed-form seed of the weights
        (:mod:`es_lightning.alignment.closed_form`, with ``ridge``; Xavier-uniform when not ``closed_form``).

        ``expert_layer(i)``/``target_layer(j)`` return the train states ``[n, d]`` of one block; each layer is read
        on its own (every target layer once for its statistics, each trained pair once more for its seed), so the
        whole cache is never in memory."""
        layout = self.built_layout
        for b, j in enumerate(layout.target.layers):
            self.target_mean[b], self.target_scale[b] = statistics(target_layer(j).double())
        for k, i in enumerate(self.trained_layers):
            raw = expert_layer(i).double()
            self.expert_mean[k], self.expert_scale[k] = statistics(raw)
            x = (raw - self.expert_mean[k].double()) / self.expert_scale[k].double()
            if not closed_form:
                nn.init.xavier_uniform_(self.enc_weight.data[k])
                nn.init.xavier_uniform_(self.dec_weight.data[k])
                continue
            target = None
            if self.objective == "paired":
                b = int(self.paired_index[k])
                target = (
                    target_layer(layout.target.layers[b]).double() - self.target_mean[b].double()
                ) / self.target_scale[b].double()
            enc_w, enc_b, dec_w, dec_b = seed_weights(x, target, layout.target.hidden_size, ridge)
            self.enc_weight.data[k] = enc_w.float()
            self.enc_bias.data[k] = enc_b.float()
            self.dec_weight.data[k] = dec_w.float()
            self.dec_bias.data[k] = dec_b.float()
