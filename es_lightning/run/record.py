"""What a fit's checkpoint records beside the weights, as one typed value saved and loaded here only: the cache
layout and the layers the auto-encoders were built for, the cache keys, the objective, step 2's layer pairs, step 3's
bundle files, and the options and key the fit was made under (:class:`FitRecord`).

The module (:class:`es_lightning.module.ExpertSteer`) holds a :class:`RunRecord` and writes it into every checkpoint;
the pipeline and ``fit --ckpt_path`` read it back with :func:`read_run_record` to reuse, refit or refuse a fit."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from es_lightning.data.cache import PairedLayout
from es_lightning.run.keys import changed_options, stage_key
from es_lightning.steering.pair_search import PairSearch

MODULE_KEY = "es_lightning"  # checkpoint entry: layout, layer map, cache keys, objective, pairs, bundles
RECORD_KEY = "es_lightning_fit_record"  # checkpoint entry: the fit's options and key


@dataclass(frozen=True)
class FitRecord:
    """A fit's ``options`` (:func:`~es_lightning.run.keys.stage_options` of ``fit``) and their ``key``."""

    options: dict[str, Any]
    key: str

    @classmethod
    def of(cls, options: dict[str, Any]) -> FitRecord:
        """The record of a fit under ``options``."""
        return cls(dict(options), stage_key(options))

    def changes_to(self, options: dict[str, Any]) -> list[str]:
        """How ``options`` differ from the ones this checkpoint was fitted with (empty: the same fit)."""
        return changed_options(self.options, options) if stage_key(options) != self.key else []


@dataclass(frozen=True)
class RunRecord:
    """Everything a fit's checkpoint says besides the weights (see the module docstring); ``layout`` is None until
    the auto-encoders are built. A record written before fit records existed has ``fit`` None: it matches no options,
    so it is refitted, never silently reused."""

    objective: str
    layout: PairedLayout | None = None
    layer_map: dict[int, int] = field(default_factory=dict)
    cache_keys: dict[str, str] = field(default_factory=dict)
    pairing: PairSearch | None = None
    bundles: dict[str, str] = field(default_factory=dict)
    fit: FitRecord | None = None

    @property
    def complete(self) -> bool:
        """The fit ran to the end: its layer pairs and its bundles are recorded."""
        return self.pairing is not None and bool(self.pairing.pairs) and bool(self.bundles)

    def with_pairing(self, pairing: PairSearch) -> RunRecord:
        return replace(self, pairing=pairing)

    def with_bundles(self, bundles: dict[str, str]) -> RunRecord:
        return replace(self, bundles=dict(bundles))

    def with_fit(self, fit: FitRecord) -> RunRecord:
        return replace(self, fit=fit)

    def built(self, layout: PairedLayout, layer_map: dict[int, int], cache_keys: dict[str, str]) -> RunRecord:
        """The record once the auto-encoders are built for ``layout`` and ``layer_map`` from caches ``cache_keys``."""
        return replace(self, layout=layout, layer_map=dict(layer_map), cache_keys=dict(cache_keys))

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Write the record into a Lightning checkpoint dict."""
        checkpoint[MODULE_KEY] = {
            "layout": self.layout.to_dict() if self.layout else None,
            "layer_map": {str(k): v for k, v in self.layer_map.items()},
            "cache_keys": dict(self.cache_keys),
            "objective": self.objective,
            **({"pairing": self.pairing.to_dict()} if self.pairing is not None else {}),
            **({"bundles": dict(self.bundles)} if self.bundles else {}),
        }
        if self.fit is not None:
            checkpoint[RECORD_KEY] = {"options": self.fit.options, "key": self.fit.key}

    @classmethod
    def load(cls, checkpoint: dict[str, Any]) -> RunRecord:
        """The record of a Lightning checkpoint dict; a clear error for one es-lightning did not write."""
        saved = checkpoint.get(MODULE_KEY) or {}
        if not saved.get("layout"):
            raise ValueError(
                "This checkpoint has no es-lightning layout: it was not written by es-lightning's fit. "
                "Fix: pass a last.ckpt from checkpoints/<run>/."
            )
        fit = checkpoint.get(RECORD_KEY)
        return cls(
            objective=str(saved.get("objective", "paired")),
            layout=PairedLayout.from_dict(saved["layout"]),
            layer_map={int(k): int(v) for k, v in saved["layer_map"].items()},
            cache_keys=dict(saved.get("cache_keys") or {}),
            pairing=PairSearch.from_dict(saved["pairing"]) if saved.get("pairing") else None,
            bundles=dict(saved.get("bundles") or {}),
            fit=FitRecord(dict(fit["options"]), str(fit["key"])) if fit else None,
        )


def read_run_record(ckpt: str | Path) -> RunRecord | None:
    """The record of the checkpoint file at ``ckpt``; None if there is no file."""
    path = Path(ckpt)
    if not path.is_file():
        return None
    import torch

    return RunRecord.load(torch.load(path, map_location="cpu", weights_only=False))


class FitRecorder(Callback):
    """Hands the fit's options and key to the module (``record_fit``) as the fit starts, so that every checkpoint the
    fit writes records them."""

    def __init__(self, options: dict[str, Any]):
        self.record = FitRecord.of(options)

    def on_fit_start(self, trainer, pl_module) -> None:
        record_fit = getattr(pl_module, "record_fit", None)
        if not callable(record_fit):
            raise TypeError(f"FitRecorder needs es_lightning.module.ExpertSteer, not {type(pl_module).__name__}.")
        record_fit(self.record)
