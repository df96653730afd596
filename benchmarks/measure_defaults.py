"""Measure the choices the paper leaves open, without generating text.

For each alignment objective (``reconstruction``: the paper; ``paired``: ours) and each pairing rule
(``lowest`` / ``highest`` MI), this script takes the chosen (expert i, target j) pairs, fits the RFM on the
expert's layer-i states of the train split, maps the direction into the target's space with the encoder,
and measures how well projecting the target's own held-out layer-j states onto it separates correct from
wrong answers (ROC AUC on the val+test questions; 0.5 = chance) and its cosine with the target's own
mean-difference vector. References on the same layers: the target's own mean-difference vector (what a
direction *could* reach) and random vectors (chance).

Both objectives use their closed-form solution (no gradient steps), so the comparison is about the
objective, not about training length.

    python benchmarks/measure_defaults.py --config configs/default.yaml
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.metrics import roc_auc_score

from es_lightning.alignment import AlignmentAutoEncoder
from es_lightning.alignment.layer_map import proportional_layer_map
from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.module import ExpertSteer
from es_lightning.steering.mi import mi_matrix
from es_lightning.steering.pairing import PairingRule, select_pairs
from es_lightning.steering.rfm import fit_rfm


def auc(states: torch.Tensor, labels: torch.Tensor, vector: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), (states @ vector).numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--top_k", type=int, default=3)
    parser.add_argument("--random_draws", type=int, default=20)
    args = parser.parse_args()
    cli = ESLightningCLI(ExpertSteer, PairedHiddenStatesDataModule, run=False, args=["--config", args.config], auto_configure_optimizers=False)
    dm = cli.datamodule
    dm.setup("fit")
    layout = dm.layout
    train = dm.split("train")
    held = {k: torch.cat([dm.split("val")[k], dm.split("test")[k]]) for k in ("expert", "target", "label")}
    layer_map = proportional_layer_map(layout.expert_layers, layout.target_layers, layout.expert.num_layers, layout.target.num_layers)
    print(f"expert {layout.expert.name} ({len(layout.expert_layers)} layers), target {layout.target.name} "
          f"({len(layout.target_layers)} layers); train rows {len(train['label'])}, held-out rows {len(held['label'])}")
    rows = []
    direction_cache: dict[int, torch.Tensor] = {}
    for objective in ("reconstruction", "paired"):
        module = AlignmentAutoEncoder(objective=objective)
        module.build(layout, layer_map)
        module.fit_statistics_and_init(train["expert"], train["target"])
        with torch.no_grad():
            xs, ys = module.standardise(train["expert"], train["target"])
            mi = mi_matrix(module.encode(xs), ys, method="gaussian").float()
        for rule in ("lowest", "highest"):
            pairs = select_pairs(mi, layout.expert_layers, layout.target_layers, layout.target.num_layers, PairingRule(rule, args.top_k))
            aucs, cosines, own, rand = [], [], [], []
            for i, j in pairs:
                if i not in direction_cache:
                    start = time.perf_counter()
                    direction_cache[i] = fit_rfm(train["expert"][:, layout.expert_layers.index(i)], train["label"]).direction
                    print(f"  RFM on expert layer {i}: {time.perf_counter() - start:.1f} s", flush=True)
                mapped = torch.nn.functional.normalize(module.encoder_linear(i) @ direction_cache[i], dim=0)
                k = layout.target_layers.index(j)
                target_train, target_held = train["target"][:, k], held["target"][:, k]
                positive = train["label"] == 1
                md = torch.nn.functional.normalize(target_train[positive].mean(0) - target_train[~positive].mean(0), dim=0)
                aucs.append(auc(target_held, held["label"], mapped))
                cosines.append(float(mapped @ md))
                own.append(auc(target_held, held["label"], md))
                generator = torch.Generator().manual_seed(j)
                rand.append(sum(abs(auc(target_held, held["label"], torch.nn.functional.normalize(torch.randn(md.shape[0], generator=generator), dim=0)) - 0.5)
                                for _ in range(args.random_draws)) / args.random_draws + 0.5)
            rows.append((objective, rule, pairs, sum(aucs) / len(aucs), sum(cosines) / len(cosines), sum(own) / len(own), sum(rand) / len(rand)))
    print("\n| objective | pairing | pairs (expert, target) | expertsteer AUC | cos with target mean-diff | target mean-diff AUC | random 0.5+mean abs dev |")
    print("|---|---|---|---|---|---|---|")
    for objective, rule, pairs, a, c, o, r in rows:
        print(f"| {objective} | {rule} | {pairs} | {a:.3f} | {c:+.2f} | {o:.3f} | {r:.3f} |")


if __name__ == "__main__":
    main()
