"""Split examples into train / val / test by group, so no question's rows land in two splits."""

from __future__ import annotations

import random
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def group_split(groups: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Example indices per split; whole groups are assigned, shuffled with ``seed``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) and sum to "
            f"less than 1 so the train split is not empty."
        )
    unique = list(dict.fromkeys(groups))
    random.Random(seed).shuffle(unique)
    n_test = round(test_fraction * len(unique))
    n_val = round(val_fraction * len(unique))
    n_test = max(n_test, 1) if test_fraction > 0 else 0
    n_val = max(n_val, 1) if val_fraction > 0 else 0
    if n_test + n_val >= len(unique):
        raise ValueError(
            f"Only {len(unique)} questions/groups: too few for a train split after val ({n_val}) and test ({n_test}). "
            f"Use more data or smaller val/test fractions."
        )
    assign = {g: "test" for g in unique[:n_test]}
    assign.update({g: "val" for g in unique[n_test : n_test + n_val]})
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for index, group in enumerate(groups):
        out[assign.get(group, "train")].append(index)
    return out
