"""LayerPairingCallback: step 2 during ``fit``, the layer-pair search with the module's ``pairing`` settings."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch

from es_lightning.callbacks.common import WhenTrainingEnds, on_rank_zero, resave_last_checkpoint, run_dir
from es_lightning.callbacks.steps import StepsModule, paired_data, steps_module
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.io import atomic_write_json, atomic_write_with
from es_lightning.steering.mi import mi_matrix_of
from es_lightning.steering.pair_search import PairSearch, search_pairs
from es_lightning.steering.pairing import choose_pairs, depth_pairs
from es_lightning.steering.rows import PairedRows

log = logging.getLogger(__name__)


def plot_pair_search(result: PairSearch, path: Path) -> None:
    """Heatmap PNG of the held-out scores of every pair (MI, or AUC for the separability rule), the chosen pairs
    circled and the same-relative-depth diagonal drawn (atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    expert_layers, target_layers = result.expert_layers, result.target_layers
    use_auc = result.rule == "separability" or result.mi is None
    values = result.auc if use_auc else result.mi
    fig = Figure(figsize=(max(4, 0.3 * len(target_layers) + 2), max(3, 0.3 * len(expert_layers) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if values is not None:
        image = ax.imshow(torch.tensor(values).numpy(), aspect="auto", cmap="viridis", origin="lower")
        fig.colorbar(
            image, ax=ax, label="held-out ROC AUC of the mapped direction" if use_auc else "held-out MI (nats)"
        )
    ax.set_xticks(range(len(target_layers)), [str(t) for t in target_layers], fontsize=6)
    ax.set_yticks(range(len(expert_layers)), [str(e) for e in expert_layers], fontsize=6)
    ax.set_xlabel("target layer")
    ax.set_ylabel("expert layer")
    e_depth, t_depth = max(expert_layers[-1], 1), max(target_layers[-1], 1)
    diagonal = [
        (k, target_layers.index(min(target_layers, key=lambda t: abs(t - e / e_depth * t_depth))))
        for k, e in enumerate(expert_layers)
    ]
    ax.plot(
        [b for _, b in diagonal],
        [a for a, _ in diagonal],
        color="white",
        linestyle="--",
        linewidth=1,
        label="same relative depth",
    )
    for e, t in result.pairs:
        ax.scatter(
            [target_layers.index(t)],
            [expert_layers.index(e)],
            s=80,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
        )
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title(
        f"{result.objective}, rule {result.rule}, top-{result.top_k}: {[tuple(p) for p in result.pairs]}", fontsize=8
    )
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


class LayerPairingCallback(WhenTrainingEnds):
    """Chooses the intervention pairs during ``fit`` with the module's ``pairing`` settings (``model.pairing``).

    ``paired`` objective: at ``setup``, before the auto-encoders are built, the search fits a closed-form map for
    every (expert, target) layer pair on the alignment rows and scores it on the val split's rows (other questions);
    the auto-encoders are then trained only for the chosen pairs, seeded with the ridge the search chose.
    ``reconstruction`` objective (the paper's as reported): when training ends, MI between the trained encoders'
    codes and the target states, on the val split's rows. Either way the result is stored in the module (hence in
    ``last.ckpt``), as ``pairing.json`` and as ``mi_heatmap.png`` in the run folder. Runs on rank 0 and broadcasts.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        module = steps_module(pl_module)
        if (
            stage != "fit"
            or module.alignment.is_built
            or module.objective != "paired"
            or module.declared_layer_map is not None
        ):
            return
        datamodule = paired_data(trainer)
        layout = datamodule.built_layout
        config = module.pairing
        log.info(
            "Layer-pair search (%s rule) over %d x %d expert/target layers ...",
            config.rule,
            len(layout.expert_layers),
            len(layout.target_layers),
        )
        start = time.perf_counter()

        def compute() -> dict:
            fit_labels = datamodule.states("alignment")["label"]  # states are read one layer at a time by the search
            outcome = search_pairs(
                PairedRows(
                    datamodule.layer_rows("alignment", "expert"),
                    datamodule.layer_rows("alignment", "target"),
                    fit_labels if (fit_labels >= 0).all() else None,
                    datamodule.alignment_groups(),
                ),
                PairedRows(
                    datamodule.layer_rows("val", "expert"),
                    datamodule.layer_rows("val", "target"),
                    datamodule.states("val")["label"],
                    datamodule.split_groups("val"),
                ),
                layout.expert_layers,
                layout.target_layers,
                layout.expert.num_layers,
                layout.target.num_layers,
                config,
                "paired",
            )
            return outcome.result.to_dict()

        result = PairSearch.from_dict(on_rank_zero(trainer, compute))
        module.record_pairing(result)
        self._publish(trainer, result, time.perf_counter() - start)

    @torch.no_grad()
    def _reconstruction_pairs(self, module: StepsModule, datamodule: PairedHiddenStatesDataModule) -> dict:
        layout, config = module.alignment.built_layout, module.pairing
        val = datamodule.states(
            "val", module.alignment.trained_layers, layout.target_layers
        )  # every trained x target pair is scored
        config.check_rows(len(val["label"]), len(val["label"]), "Layer pairing on the val split")
        xs, ys = module.alignment.standardise(val["expert"].to(module.device), val["target"].to(module.device))
        assert ys is not None  # target states were given
        encoded = module.alignment.encode(xs).cpu()
        rule = config.pairing_rule
        baseline = depth_pairs(
            module.alignment.trained_layers,
            layout.target_layers,
            layout.expert.num_layers,
            layout.target.num_layers,
            rule,
        )
        if config.rule == "separability":
            raise ValueError(
                "The separability rule needs the paired objective; "
                "use rule: highest or lowest with objective: reconstruction."
            )
        mi = None if config.rule == "depth" else mi_matrix_of(encoded, ys.cpu(), config.mi_estimator()).float()
        pairs = choose_pairs(
            rule,
            module.alignment.trained_layers,
            layout.target_layers,
            layout.expert.num_layers,
            layout.target.num_layers,
            mi=mi,
        )
        return PairSearch(
            rule=config.rule,
            objective="reconstruction",
            expert_layers=list(module.alignment.trained_layers),
            target_layers=list(layout.target_layers),
            pairs=pairs,
            mi=None if mi is None else mi.tolist(),
            auc=None,
            depth_pairs=baseline,
            ridge=None,
            mi_method=config.mi_method,
            n_fit=0,
            n_heldout=len(val["label"]),
            top_k=config.top_k,
        ).to_dict()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ran = True
        module = steps_module(pl_module)
        if module.objective != "reconstruction" and module.pairing_result is not None:
            return
        start = time.perf_counter()
        if module.objective == "reconstruction":
            datamodule = paired_data(trainer)
            result = PairSearch.from_dict(on_rank_zero(trainer, lambda: self._reconstruction_pairs(module, datamodule)))
        else:  # a declared layer_map: its pairs are the intervention pairs
            layout = module.alignment.built_layout
            pairs = sorted(module.alignment.layer_map.items(), key=lambda p: p[1])
            result = PairSearch(
                "declared",
                "paired",
                list(layout.expert_layers),
                list(layout.target_layers),
                pairs,
                None,
                None,
                [],
                module.ridge,
                top_k=len(pairs),
            )
        module.record_pairing(result)
        self._publish(trainer, result, time.perf_counter() - start)
        resave_last_checkpoint(trainer)

    def _publish(self, trainer: L.Trainer, result: PairSearch, seconds: float) -> None:
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        atomic_write_json(folder / "pairing.json", result.to_dict())
        plot_pair_search(result, folder / "mi_heatmap.png")
        log.info(
            "Layer pairs (expert, target): %s, ridge %s (%.1f s) -> %s",
            [tuple(p) for p in result.pairs],
            result.ridge,
            seconds,
            folder / "pairing.json",
        )
