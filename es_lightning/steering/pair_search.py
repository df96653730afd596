"""Step 2 of ExpertSteer, the search: score every (expert layer i, target layer j) pair on held-out rows.

For every i and j a closed-form ridge map from expert layer i to target layer j is fitted on the *fit* rows
only, and scored on *held-out* rows (other questions): the MI between mapped expert states and target states,
and the ROC AUC with which the mapped expert direction separates the held-out rows by label. The rule
(:mod:`es_lightning.steering.pairing`) then picks pairs from those matrices.

Bounded cost at any width: each layer is standardised (per-feature mean, one scalar scale) and reduced to its
top ``max_components`` principal components on the fit rows. In those coordinates the expert side's Gram
matrix is diagonal, so one SVD per expert layer serves every target layer and every ridge, and no full-width
L_E x L_T family of maps is ever materialised: only the maps of the chosen pairs are expanded to full width.

``objective``: ``paired`` (ours) maps expert layer i onto target layer j by ridge regression, with the ridge
chosen by grouped cross-validation on the fit rows; ``reconstruction`` (the paper's, as reported) has no target
in the map: the code is the expert layer's top ``d_T`` principal components (the closed-form optimum of an affine
auto-encoder), so the MI is between those codes and the target states.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from es_lightning.alignment.maps import Objective
from es_lightning.memory import announce, pair_search_estimate
from es_lightning.steering.mi import METHODS as MI_METHODS
from es_lightning.steering.mi import MIOptions, MISettings, min_rows
from es_lightning.steering.pair_layers import _full_width_map, _Layer, _reduce
from es_lightning.steering.pair_scores import _choose_ridge, _score_matrices
from es_lightning.steering.pairing import PairingRule, Rule, choose_pairs, depth_pairs, depth_partner
from es_lightning.steering.rows import LayerStates, PairedRows
from es_lightning.stopping import check_stop, stage

log = logging.getLogger(__name__)


@dataclass
class PairSearchConfig:
    """How layer pairs are searched (``model.pairing``); one config serves the fit's pairing and every evaluation
    fold. The rule itself is applied by :func:`es_lightning.steering.pairing.choose_pairs`."""

    rule: Rule = "depth"
    """``depth`` (same relative depth, no statistics; the default: no MI rule beat it, README), ``highest`` held-out
    MI (ours), ``lowest`` (the paper's criterion as secondary sources report it) or ``separability`` (ours)."""
    top_k: int = 3
    """Number of (expert layer, target layer) pairs steered."""
    one_target_per_expert: bool = True
    """Use each expert layer at most once (each target layer always is)."""
    depth_window: tuple[float, float] | None = None
    """Relative depths ``[low, high]`` the target layers must lie in; null: the rule's own (depth: 0.4-0.6)."""
    mi_method: Literal["gaussian", "ksg"] = "gaussian"
    """The MI estimator (:mod:`es_lightning.steering.mi`); the paper names none: ``gaussian`` is ours."""
    mi_options: MISettings = field(default_factory=MISettings)
    """The estimator's options (e.g. ``{n_components: 8}``), checked for ``mi_method`` by :meth:`mi_estimator`."""
    heldout_fraction: float = 0.3
    """Share of the questions held out to score pairs when no held-out rows are given (evaluation folds)."""
    ridges: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    """Ridge grid of the closed-form maps (relative to the mean Gram diagonal), chosen by grouped cross-validation;
    one value fixes it."""
    ridge_folds: int = 3
    """Folds of that cross-validation (grouped by question)."""
    max_components: int = 256
    """Principal components kept per layer while scoring pairs."""
    max_rows: int | None = 4000
    """A seeded subsample of the fit rows bounds the cost; null: every row."""
    seed: int = 0
    """Seed of the subsample and of the MI estimator."""

    @property
    def pairing_rule(self) -> PairingRule:
        window = (float(self.depth_window[0]), float(self.depth_window[1])) if self.depth_window else None
        return PairingRule(self.rule, self.top_k, self.one_target_per_expert, window)

    def validate(self) -> None:
        """Refuse bad settings before any model is loaded."""
        self.pairing_rule.validate()
        if self.mi_method not in MI_METHODS:
            raise ValueError(f"Unknown MI method {self.mi_method!r}: use one of {list(MI_METHODS)}.")
        try:
            self.mi_estimator()
        except ValueError as err:
            raise ValueError(
                f"model.pairing.mi_options for mi_method {self.mi_method!r}: {err} Fix: drop the option, or set "
                "model.pairing.mi_method to the estimator that takes it ('k': ksg; 'shrinkage': gaussian)."
            ) from err
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}.")
        if not self.ridges or any(
            not (isinstance(r, (int, float)) and r > 0 and math.isfinite(r)) for r in self.ridges
        ):
            raise ValueError(f"ridges must be a non-empty list of positive numbers, got {self.ridges!r}.")
        if self.ridge_folds < 2:
            raise ValueError(f"ridge_folds must be >= 2, got {self.ridge_folds}.")
        if self.max_components < 1 or (self.max_rows is not None and self.max_rows < 10):
            raise ValueError(
                f"max_components must be >= 1 and max_rows >= 10 or null; got {self.max_components}, {self.max_rows}."
            )

    def min_heldout_rows(self) -> int:
        """The fewest held-out rows the MI estimator accepts."""
        return min_rows(self.mi_estimator())

    def mi_estimator(self) -> MIOptions:
        """The MI estimator's resolved settings: ``mi_options`` for ``mi_method``, seeded with ``seed`` unless they
        set their own."""
        return self.mi_options.resolve(self.mi_method, self.seed)

    def check_rows(self, n_fit: int, n_heldout: int, where: str) -> None:
        """Clear errors for too few rows to fit maps or to estimate MI."""
        if self.rule == "depth":
            return
        need = self.min_heldout_rows()
        if n_heldout < need:
            raise ValueError(
                f"{where}: {n_heldout} held-out rows, but {self.mi_method} MI with these options needs at least "
                f"{need}. Use more questions, a larger pairing.heldout_fraction, or a smaller "
                "pairing.mi_options.n_components."
            )
        if n_fit < 2 * self.ridge_folds:
            raise ValueError(
                f"{where}: {n_fit} fit rows are too few for {self.ridge_folds}-fold ridge selection; "
                "use more questions."
            )


@dataclass
class PairSearch:
    """What the search decided, JSON-ready: the held-out matrices, the chosen pairs and how they were chosen."""

    rule: str
    objective: str
    expert_layers: list[int]
    target_layers: list[int]
    pairs: list[tuple[int, int]]
    mi: list[list[float]] | None  # [L_E][L_T] held-out MI in nats (None for the depth rule)
    auc: list[list[float]] | None  # [L_E][L_T] held-out ROC AUC of the mapped expert direction (None without labels)
    depth_pairs: list[tuple[int, int]]  # what the depth rule would choose, for comparison
    ridge: float | None
    ridge_scores: dict[str, float] = field(default_factory=dict)  # ridge -> grouped-CV mean squared error
    mi_method: str = "gaussian"
    n_fit: int = 0
    n_heldout: int = 0
    top_k: int = 3

    def to_dict(self) -> dict:
        """JSON-ready form."""
        out = asdict(self)
        out["pairs"] = [list(p) for p in self.pairs]
        out["depth_pairs"] = [list(p) for p in self.depth_pairs]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PairSearch:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["pairs"] = [tuple(p) for p in data["pairs"]]
        data["depth_pairs"] = [tuple(p) for p in data.get("depth_pairs", [])]
        return cls(**data)


@dataclass
class SearchOutcome:
    """The decision plus the full-width linear maps ``[d_T, d_E]`` of the chosen expert layers (directions only)."""

    result: PairSearch
    linear: dict[int, torch.Tensor]


def paired_maps(
    fit: PairedRows,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    ridge: float,
    max_components: int = 256,
) -> dict[int, torch.Tensor]:
    """Closed-form ridge maps ``[d_T, d_E]`` of given pairs, fitted on ``fit`` rows (for measuring a fixed ridge)."""
    out = {}
    for i, j in pairs:
        e = fit.expert.layer(list(expert_layers).index(i)).double().numpy()
        t = fit.target.layer(list(target_layers).index(j)).double().numpy()
        out[i] = _full_width_map(
            _reduce(e, e[:1], max_components), _reduce(t, t[:1], max_components), ridge, t.shape[1]
        )
    return out


def _subsampled(fit: PairedRows, config: PairSearchConfig) -> PairedRows:
    """A seeded subsample of ``config.max_rows`` fit rows (in their order), or all of them."""
    if config.max_rows and len(fit) > config.max_rows:
        keep = np.sort(np.random.default_rng(config.seed).permutation(len(fit))[: config.max_rows])
        fit = fit.take(keep.tolist())
    return fit


def _same_depth_ridge(
    experts: list[_Layer],
    targets: list[_Layer],
    fit: PairedRows,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    expert_depth: int,
    target_depth: int,
    config: PairSearchConfig,
) -> tuple[float, dict[str, float]]:
    """The ridge of the paired maps, chosen on each expert layer's map onto its same-depth target layer, and the
    cross-validated error of every ridge tried."""
    same_depth = [
        targets[list(target_layers).index(depth_partner(e, expert_depth, target_layers, target_depth))]
        for e in expert_layers
    ]
    return _choose_ridge(experts, same_depth, fit.groups, config)


@stage("layer-pair search")
def search_pairs(
    fit: PairedRows,
    heldout: PairedRows,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    expert_depth: int,
    target_depth: int,
    config: PairSearchConfig,
    objective: Objective = "paired",
) -> SearchOutcome:
    """Score every pair on held-out rows, choose pairs by ``config.rule`` and return the chosen maps.

    ``fit`` rows fit the maps (and choose the ridge); ``heldout`` rows, of other questions, score them. Labels
    of ``fit`` give the expert direction for the ``separability`` scores; labels of ``heldout`` score it.
    """
    rule = _checked_rule(fit, heldout, len(expert_layers), len(target_layers), config, objective)
    fit = _subsampled(fit, config)
    baseline = depth_pairs(expert_layers, target_layers, expert_depth, target_depth, rule)
    d_t = fit.target.width
    experts = _reduced(fit.expert, heldout.expert, len(expert_layers), config.max_components)
    targets = _reduced(fit.target, heldout.target, len(target_layers), config.max_components)
    ridge: float | None = None
    ridge_scores: dict[str, float] = {}
    if objective == "paired":
        ridge, ridge_scores = _same_depth_ridge(
            experts, targets, fit, expert_layers, target_layers, expert_depth, target_depth, config
        )
    mi, auc = _score_matrices(experts, targets, fit, heldout, expert_layers, target_layers, config, objective, ridge)
    pairs = choose_pairs(
        rule,
        expert_layers,
        target_layers,
        expert_depth,
        target_depth,
        mi=None if mi is None else torch.from_numpy(mi),
        auc=None if auc is None else torch.from_numpy(auc),
    )
    linear = {
        i: _full_width_map(experts[list(expert_layers).index(i)], targets[list(target_layers).index(j)], ridge, d_t)
        for i, j in pairs
    }
    result = PairSearch(
        rule=config.rule,
        objective=objective,
        expert_layers=list(expert_layers),
        target_layers=list(target_layers),
        pairs=[(int(i), int(j)) for i, j in pairs],
        mi=None if mi is None else mi.tolist(),
        auc=None if auc is None else auc.tolist(),
        depth_pairs=baseline,
        ridge=ridge,
        ridge_scores=ridge_scores,
        mi_method=config.mi_method,
        n_fit=len(fit),
        n_heldout=len(heldout),
        top_k=config.top_k,
    )
    return SearchOutcome(result, linear)


def _checked_rule(
    fit: PairedRows, heldout: PairedRows, n_expert: int, n_target: int, config: PairSearchConfig, objective: Objective
) -> PairingRule:
    """The pairing rule, once the settings, row counts, objective and question split are checked (and the memory
    estimate announced)."""
    config.validate()
    rule = config.pairing_rule
    rule.check_fits(n_expert, n_target)
    config.check_rows(len(fit), len(heldout), "Layer-pair search")
    announce(
        pair_search_estimate(
            len(fit),
            len(heldout),
            n_expert,
            fit.expert.width,
            n_target,
            fit.target.width,
            config.max_components,
            config.max_rows,
            config.top_k,
        )
    )
    if objective not in ("paired", "reconstruction"):
        raise ValueError(f"Unknown objective {objective!r}: use 'paired' or 'reconstruction'.")
    overlap = set(fit.groups) & set(heldout.groups)
    if overlap:
        raise ValueError(
            f"The fit and held-out rows share questions {sorted(map(str, overlap))[:3]}; hold out whole questions."
        )
    return rule


def _reduced(fit_side: LayerStates, held_side: LayerStates, count: int, max_components: int) -> list[_Layer]:
    """The first ``count`` layers of one side, each reduced on its fit rows (one full-width layer at a time)."""
    layers = []
    for position in range(count):
        check_stop()
        layers.append(
            _reduce(
                fit_side.layer(position).double().numpy(), held_side.layer(position).double().numpy(), max_components
            )
        )
    return layers
