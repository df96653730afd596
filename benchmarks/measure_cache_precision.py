"""Measure what storing the paired cache in bfloat16 or float16 does to the downstream numbers, without re-extracting.

A half-precision cache stores ``states.to(dtype)`` and reads it back as float32, so rounding an existing float32
cache's states to bfloat16/float16 and back is exactly what such a cache would hold. For each storage precision
(float32, bfloat16, float16), on the data module's own split, as ``fit`` does: the layer-pair search fits on the
train split and scores every pair on the val split; reported are the pairs it picks (and whether they differ from
float32's), the held-out (val) MI at those pairs, and the held-out *test* ROC AUC with which the target's test
states at layer j, projected on the expert's RFM direction (train split) mapped by the search's map, separate
correct from wrong answers. Both are also reported at float32's pairs (maps refitted on the rounded states), which
separates the effect of storage from that of a changed choice, with the largest change of any pair's MI. The
cache is read directly from its shards (format 1: ``expert``/``target``/``label`` per shard, or format 2: one file
per side), so it works on caches written before the cache format changed.

    OMP_NUM_THREADS=1 python benchmarks/measure_cache_precision.py --cache /tmp/freshcache/paired/<key> \
        --config configs/default.yaml --cache_dir /tmp/freshcache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.module import ExpertSteer
from es_lightning.steering.pair_search import paired_maps, search_pairs
from es_lightning.steering.rfm import fit_rfm
from es_lightning.steering.rows import PairedRows

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_cache(folder: Path) -> dict[str, torch.Tensor]:
    """Every shard of a cache folder concatenated (``expert``, ``target``, ``label``), as stored (format 1 or 2)."""
    meta = json.loads((folder / "meta.json").read_text())
    n_shards = -(-meta["n_examples"] // meta["shard_size"])
    parts: dict[str, list[torch.Tensor]] = {"expert": [], "target": [], "label": []}
    for shard in range(n_shards):
        for side in ("expert", "target"):
            path = folder / f"shard-{shard:05d}.safetensors"
            if not path.exists():
                path = folder / f"shard-{shard:05d}.{side}.safetensors"
            with safe_open(str(path), framework="pt") as handle:
                parts[side].append(handle.get_tensor(side))
                if side == "expert":
                    parts["label"].append(handle.get_tensor("label"))
    return {name: torch.cat(values) for name, values in parts.items()}


def auc(states: torch.Tensor, labels: torch.Tensor, vector: torch.Tensor) -> float:
    return float(roc_auc_score(labels.numpy(), (states.double() @ vector.double()).numpy()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="a paired cache folder: <cache_dir>/paired/<key>")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument(
        "--cache_dir", default=None, help="data.cache_dir of the run that built the cache (for the models' configs)"
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    extra = ["--data.cache_dir", args.cache_dir] if args.cache_dir else []
    cli = ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        run=False,
        args=["--config", args.config, *extra],
        auto_configure_optimizers=False,
    )
    dm, model = cli.datamodule, cli.model
    layout = dm.prepare_layout()  # examples and split; no model weights, no extraction
    stored = read_cache(Path(args.cache))
    labels = torch.tensor([e.label for e in dm.question_table.examples])
    if len(stored["label"]) != len(labels) or not torch.equal(stored["label"].long(), labels):
        raise SystemExit(
            f"{args.cache} does not hold this config's examples ({len(stored['label'])} rows, {len(labels)} examples)."
        )
    if stored["expert"].shape[1:] != (len(layout.expert_layers), layout.expert.hidden_size):
        raise SystemExit(
            f"{args.cache} holds expert states of shape {tuple(stored['expert'].shape[1:])}, not this config's layers."
        )
    index = {name: torch.tensor(dm.question_table.split_indices[name]) for name in ("train", "val", "test")}
    groups = {name: dm.split_groups(name) for name in index}
    t_pos, e_pos = layout.target_layers.index, layout.expert_layers.index
    config = model.pairing
    rfm_options = model.vectors.rfm_options.fit_arguments()
    print(
        f"{layout.expert.name} -> {layout.target.name}; rows train {len(index['train'])}, val {len(index['val'])}, "
        f"test {len(index['test'])}; rule {config.rule}, top_k {config.top_k}",
        flush=True,
    )
    rfm_cache: dict[tuple[str, int], torch.Tensor] = {}

    def mapped_auc(states, name, outcome_linear, i, j) -> float:
        if (name, i) not in rfm_cache:
            train_expert = states["expert"][index["train"], e_pos(i)]
            rfm_cache[(name, i)] = fit_rfm(
                train_expert, labels[index["train"]], groups=groups["train"], seed=model.vectors.seed, **rfm_options
            ).direction
        mapped = torch.nn.functional.normalize((outcome_linear[i] @ rfm_cache[(name, i)]).float(), dim=0)
        return auc(states["target"][index["test"], t_pos(j)], labels[index["test"]], mapped)

    rows, reference, reference_mi = [], None, None
    for name, dtype in PRECISIONS.items():
        start = time.perf_counter()
        states = {
            side: stored[side].to(dtype).float() for side in ("expert", "target")
        }  # what that cache would read back
        error = max(
            float(((states[s] - stored[s]).norm(dim=-1) / stored[s].norm(dim=-1).clamp_min(1e-12)).max())
            for s in states
        )
        part = {
            k: PairedRows(states["expert"][index[k]], states["target"][index[k]], labels[index[k]], groups[k])
            for k in ("train", "val")
        }
        outcome = search_pairs(
            part["train"],
            part["val"],
            layout.expert_layers,
            layout.target_layers,
            layout.expert.num_layers,
            layout.target.num_layers,
            config,
            model.objective,
        )
        result = outcome.result
        mi = np.array(result.mi)
        worst = np.unravel_index(np.abs(mi - (mi if reference_mi is None else reference_mi)).argmax(), mi.shape)
        if reference is None:
            reference, reference_mi = result.pairs, mi
            chosen = np.zeros(mi.shape, dtype=bool)
            for i, j in result.pairs:
                chosen[e_pos(i), t_pos(j)] = True
            margin = (float(mi[chosen].min()), float(mi[~chosen].max()))
        at = lambda matrix, pairs: [float(matrix[e_pos(i), t_pos(j)]) for i, j in pairs]  # noqa: E731
        own = [mapped_auc(states, name, outcome.linear, i, j) for i, j in result.pairs]
        # the float32 pairs' maps under this precision: the effect of storage alone, without the change of pairs
        fixed = paired_maps(
            part["train"], layout.expert_layers, layout.target_layers, reference, result.ridge, config.max_components
        )
        at_reference = [mapped_auc(states, name, fixed, i, j) for i, j in reference]
        rows.append(
            {
                "storage": name,
                "pairs": [list(p) for p in result.pairs],
                "same_pairs_as_float32": result.pairs == reference,
                "ridge": result.ridge,
                "heldout_mi": at(mi, result.pairs),
                "mean_heldout_mi": float(np.mean(at(mi, result.pairs))),
                "mean_heldout_mi_at_float32_pairs": float(np.mean(at(mi, reference))),
                "max_abs_mi_change": float(np.abs(mi - reference_mi).max()),
                "max_abs_mi_change_at": [layout.expert_layers[worst[0]], layout.target_layers[worst[1]]],
                "mean_abs_mi_change": float(np.abs(mi - reference_mi).mean()),
                "test_auc": own,
                "mean_test_auc": float(np.mean(own)),
                "mean_test_auc_at_float32_pairs": float(np.mean(at_reference)),
                "max_relative_rounding_error": error,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nfloat32 held-out MI: the lowest chosen pair scores {margin[0]:.4f} nats, "
        f"the highest pair not chosen {margin[1]:.4f}"
    )
    print(
        "\n| storage | pairs (expert, target) | same pairs | held-out MI at its pairs (mean) | at float32's pairs "
        "| MI change over all pairs: mean abs, max abs (at expert, target) "
        "| test AUC of mapped direction, its pairs (mean) | at float32's pairs | max relative rounding error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['storage']} | {', '.join(f'({i}, {j})' for i, j in r['pairs'])} | "
            f"{'yes' if r['same_pairs_as_float32'] else 'no'} | "
            f"{r['mean_heldout_mi']:.4f} | {r['mean_heldout_mi_at_float32_pairs']:.4f} | "
            f"{r['mean_abs_mi_change']:.4f}, "
            f"{r['max_abs_mi_change']:.4f} ({r['max_abs_mi_change_at'][0]}, {r['max_abs_mi_change_at'][1]}) | "
            f"{' / '.join(f'{a:.3f}' for a in r['test_auc'])} ({r['mean_test_auc']:.4f}) | "
            f"{r['mean_test_auc_at_float32_pairs']:.4f} | "
            f"{r['max_relative_rounding_error']:.1e} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
