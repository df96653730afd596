"""Measure the choices the paper leaves open, without generating text, on the data module's own split.

The pair search fits on the train split and scores pairs on the val split (as ``fit`` does); every figure below
is then measured on the *test* split, which no fitted piece has seen: the ROC AUC with which the target's own
layer-j test states, projected on a direction, separate correct from wrong answers (0.5 = chance).

1. Pairing: objective (``reconstruction``: the paper's; ``paired``: ours) x rule (``lowest``: the paper's as
   reported; ``highest``, ``separability``: ours; ``depth``: the baseline). Direction: the RFM on expert layer i
   (train split, validation grouped by question), mapped by the search's closed-form map. Also the Spearman
   correlation between held-out MI and held-out separability AUC over all pairs.
2. Ridge of the paired map at the chosen pairs: each fixed value against the one grouped CV chose.
3. Epochs: the closed-form seed of the auto-encoder against the same auto-encoder after ``--epochs`` AdamW epochs.
4. RFM options: per-feature standardisation (ours so far) or raw states (the RFM authors'), 3 or 8 AGOP iterations;
   AUC of the expert's own test states on its direction, and of the target's states on the mapped direction.

    python benchmarks/measure_defaults.py --config configs/default.yaml --out checkpoints/measure_defaults.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import lightning as L
import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from es_lightning.alignment import AlignmentMaps
from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.io import atomic_write_json
from es_lightning.module import ExpertSteer
from es_lightning.steering.pair_search import paired_maps, search_pairs
from es_lightning.steering.rfm import fit_rfm
from es_lightning.steering.rows import PairedRows


def auc(states: torch.Tensor, labels: torch.Tensor, vector: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), (states.double() @ vector.double()).numpy()))


def unit(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(v.float(), dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="checkpoints/measure_defaults.json")
    args = parser.parse_args()
    cli = ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        run=False,
        args=["--config", args.config],
        auto_configure_optimizers=False,
    )
    dm, model = cli.datamodule, cli.model
    dm.setup("fit")
    layout = dm.layout
    split = {name: dm.states(name, layout.expert_layers, layout.target_layers) for name in ("train", "val", "test")}
    rows = {name: PairedRows(s["expert"], s["target"], s["label"], dm.split_groups(name)) for name, s in split.items()}
    test = split["test"]
    e_index, t_index = layout.expert_layers.index, layout.target_layers.index
    print(
        f"expert {layout.expert.name} ({len(layout.expert_layers)} layers), "
        f"target {layout.target.name} ({len(layout.target_layers)}); "
        f"rows: train {len(split['train']['label'])}, val {len(split['val']['label'])}, "
        f"test {len(split['test']['label'])}",
        flush=True,
    )
    rfm_cache: dict[tuple, torch.Tensor] = {}

    def rfm(side: str, layer: int, **options) -> torch.Tensor:
        key = (side, layer, tuple(sorted(options.items())))
        if key not in rfm_cache:
            start = time.perf_counter()
            states = split["train"][side][:, (e_index if side == "expert" else t_index)(layer)]
            rfm_cache[key] = fit_rfm(
                states, split["train"]["label"], groups=rows["train"].groups, seed=0, **options
            ).direction
            print(f"  RFM {side} layer {layer} {options}: {time.perf_counter() - start:.1f} s", flush=True)
        return rfm_cache[key]

    def mapped_auc(pairs, linear, **options) -> float:
        return float(
            np.mean(
                [
                    auc(test["target"][:, t_index(j)], test["label"], unit(linear(i) @ rfm("expert", i, **options)))
                    for i, j in pairs
                ]
            )
        )

    results: dict = {"layout": {"expert": layout.expert.name, "target": layout.target.name}}
    # 1. pairing
    pairing_rows, searches = [], {}
    for objective, rule in (
        ("reconstruction", "lowest"),
        ("reconstruction", "highest"),
        ("paired", "lowest"),
        ("paired", "highest"),
        ("paired", "separability"),
        ("paired", "depth"),
    ):
        start = time.perf_counter()
        outcome = search_pairs(
            rows["train"],
            rows["val"],
            layout.expert_layers,
            layout.target_layers,
            layout.expert.num_layers,
            layout.target.num_layers,
            replace(model.pairing, rule=rule),
            objective,
        )
        searches[(objective, rule)] = outcome
        pairs = outcome.result.pairs
        own = float(np.mean([auc(test["target"][:, t_index(j)], test["label"], rfm("target", j)) for _, j in pairs]))
        pairing_rows.append(
            {
                "objective": objective,
                "rule": rule,
                "pairs": [list(p) for p in pairs],
                "ridge": outcome.result.ridge,
                "expertsteer_auc": mapped_auc(pairs, outcome.linear.__getitem__),
                "rfm_self_auc": own,
                "search_seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(pairing_rows[-1], flush=True)
    paired = searches[("paired", "highest")].result
    rho = spearmanr(np.array(paired.mi).ravel(), np.array(paired.auc).ravel()).statistic
    results["pairing"] = pairing_rows
    results["spearman_mi_vs_auc"] = float(rho)
    # 2. ridge
    pairs = paired.pairs
    ridge_rows = []
    for ridge in sorted(model.pairing.ridges):
        linear = paired_maps(
            rows["train"], layout.expert_layers, layout.target_layers, pairs, ridge, model.pairing.max_components
        )
        ridge_rows.append(
            {
                "ridge": ridge,
                "chosen_by_cv": ridge == paired.ridge,
                "expertsteer_auc": mapped_auc(pairs, linear.__getitem__),
            }
        )
        print(ridge_rows[-1], flush=True)
    results["ridge"] = {"pairs": [list(p) for p in pairs], "cv_mse": paired.ridge_scores, "rows": ridge_rows}

    # 3. epochs: the auto-encoder's closed-form seed against the same auto-encoder after training
    seeded = AlignmentMaps(objective="paired")
    seeded.build(layout, dict(pairs))
    alignment = dm.states("alignment", layout.expert_layers, layout.target_layers)
    seeded.fit_statistics_and_init(alignment["expert"], alignment["target"], paired.ridge)
    start = time.perf_counter()
    trained = ExpertSteer(
        objective="paired",
        layer_map=dict(pairs),
        ridge=paired.ridge,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4, weight_decay=0.0),
    )
    L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(trained, datamodule=dm)
    results["epochs"] = {
        "pairs": [list(p) for p in pairs],
        "epochs": args.epochs,
        "train_seconds": round(time.perf_counter() - start, 1),
        "closed_form_auc": mapped_auc(pairs, seeded.encoder_linear),
        "trained_auc": mapped_auc(pairs, lambda i: trained.alignment.encoder_linear(i).cpu()),
    }
    print(results["epochs"], flush=True)
    # 4. RFM options
    linear = searches[("paired", "highest")].linear
    rfm_rows = []
    for standardize in (True, False):
        for iters in (3, 8):
            options = {"standardize": standardize, "iters": iters}
            expert_auc = float(
                np.mean(
                    [auc(test["expert"][:, e_index(i)], test["label"], rfm("expert", i, **options)) for i, _ in pairs]
                )
            )
            target_auc = float(
                np.mean(
                    [auc(test["target"][:, t_index(j)], test["label"], rfm("target", j, **options)) for _, j in pairs]
                )
            )
            rfm_rows.append(
                {
                    **options,
                    "expert_auc": expert_auc,
                    "mapped_auc": mapped_auc(pairs, linear.__getitem__, **options),
                    "rfm_self_auc": target_auc,
                }
            )
            print(rfm_rows[-1], flush=True)
    results["rfm"] = rfm_rows
    atomic_write_json(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
