"""What each stage of a run depends on, and the content key that decides whether its earlier output is reused.

Every option of ``es-lightning`` / ``es-lightning-pipeline`` is declared here, once: under the stages whose results
it changes (:data:`STAGE_OPTIONS`), or as changing no result (:data:`NO_RESULT`). A stage's key hashes the values
of its options, the contents of the files they name, and the keys of the artifacts it reads (e.g. the checkpoint's
bytes for the report). A rerun reuses a stage's output only under the same key; ``tests/test_run_keys.py`` checks
that every option is declared, and that changing one reruns exactly the stages that depend on it.

Stages: ``fit`` (auto-encoders, layer pairs and bundles: one checkpoint), ``report`` (``test``), ``predictions``
(``predict``). The paired cache has its own content key in :mod:`es_lightning.data.cache`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from es_lightning.io import sha256_file, sha256_json

Stage = Literal["fit", "report", "predictions"]

# Options of the data the paired cache is built from: they change the fit and everything after it.
_DATA = (
    "data.expert",
    "data.target",
    "data.data",
    "data.alignment_data",
    "data.pooling",
    "data.splits",
    "data.cache_dtype",
)
# Trainer options that change what training computes (the rest, e.g. the progress bar, change nothing).
_TRAINING = tuple(
    f"trainer.{name}"
    for name in (
        "accelerator",
        "strategy",
        "devices",
        "num_nodes",
        "precision",
        "callbacks",
        "fast_dev_run",
        "max_epochs",
        "min_epochs",
        "max_steps",
        "min_steps",
        "max_time",
        "limit_train_batches",
        "limit_val_batches",
        "overfit_batches",
        "val_check_interval",
        "check_val_every_n_epoch",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "deterministic",
        "benchmark",
        "use_distributed_sampler",
        "plugins",
        "sync_batchnorm",
        "reload_dataloaders_every_n_epochs",
    )
)
# Step 2 and 3 options: the fit uses them for its pairs and bundles, and the nested test in every fold.
_STEERING = ("model.objective", "model.pairing", "model.vectors")

STAGE_OPTIONS: dict[Stage, tuple[str, ...]] = {
    "fit": (
        "seed_everything",
        *_DATA,
        "data.batch_size",
        *_TRAINING,
        *_STEERING,
        "model.pair_weight",
        "model.layer_map",
        "model.closed_form_init",
        "model.ridge",
        "model.optimizer",
        "model.scheduler",
    ),
    "report": ("seed_everything", *_DATA, *_STEERING, "model.evaluation", "model.target_dtype"),
    "predictions": (
        "data.target",
        "data.predict_data",
        "data.predict_batch_size",
        "model.generation",
        "model.predict",
        "model.target_dtype",
    ),
}

# Options that change no result: where outputs go, what is printed, how fast or on how many workers data loads.
NO_RESULT: tuple[str, ...] = (
    "config",
    "run_name",
    "output_dir",
    "ckpt_path",
    "quiet",
    "verbose",
    "checkpoint",
    "model.report_dir",
    "data.cache_dir",
    "data.progress",
    "data.num_workers",
    "trainer.logger",
    # how the paired cache is extracted and stored; its own key (es_lightning.data.cache) leaves these out too
    "data.shard_size",
    "data.extract_batch_size",
    "data.extract_batch_tokens",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.enable_checkpointing",
    "trainer.default_root_dir",
    "trainer.profiler",
    "trainer.detect_anomaly",
    "trainer.barebones",
    "trainer.inference_mode",
    "trainer.num_sanity_val_steps",
    "trainer.limit_test_batches",
    "trainer.limit_predict_batches",
    "trainer.enable_autolog_hparams",
    "trainer.model_registry",
    "return_predictions",
)

# Options naming files whose contents a stage reads (hashed with the options, so an edited file is a change).
_FILES = {
    "data.data.path",
    "data.alignment_data.path",
    "data.splits.val_path",
    "data.splits.test_path",
    "data.predict_data.path",
}


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for every leaf of a nested mapping (a jsonargparse Namespace's ``as_dict()``)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping) and value and "class_path" not in value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def flat_options(config: Any) -> dict[str, Any]:
    """Every option of a parsed stage configuration (a Namespace or a plain mapping), by dotted path."""
    return _flat(config.as_dict() if hasattr(config, "as_dict") else dict(config))


def undeclared(config: Any) -> list[str]:
    """Options declared neither under a stage nor as changing no result (a new option must be declared here)."""
    declared = [p for paths in STAGE_OPTIONS.values() for p in paths] + list(NO_RESULT)
    return sorted(path for path in flat_options(config) if not _under(path, declared))


def stage_options(config: Any, stage: Stage) -> dict[str, Any]:
    """The options ``stage`` depends on, with their values; an option naming an existing file is its contents' hash
    (so an edited file is a change, and a moved one is not)."""
    options = {}
    for path, value in flat_options(config).items():
        if not _under(path, STAGE_OPTIONS[stage]) or _under(path, NO_RESULT):
            continue
        if path in _FILES and value is not None and Path(str(value)).is_file():
            options[path] = {"sha256": sha256_file(str(value))}  # the contents, wherever the file lies
        else:
            options[path] = repr_value(value)
    return options


def repr_value(value: Any) -> Any:
    """A JSON-able, stable form of an option's value (lists, dicts, paths, class_path/init_args dicts)."""
    if isinstance(value, Mapping):
        return {str(k): repr_value(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [repr_value(v) for v in value]
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if hasattr(value, "as_dict"):
        return repr_value(value.as_dict())
    return str(value)


def stage_key(options: Mapping[str, Any], inputs: Mapping[str, str] | None = None) -> str:
    """The content key of a stage: its options (see :func:`stage_options`) and its input artifacts' hashes."""
    return sha256_json({"options": dict(options), "inputs": dict(inputs or {})})


def changed_options(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """``"path: old -> new"`` for each option that differs between two :func:`stage_options` records."""
    missing = object()
    lines = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path, missing), after.get(path, missing)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and set(old) == set(new) == {"sha256"}:
            lines.append(f"{path}: the file's contents changed")
        else:
            lines.append(
                f"{path}: {'(unset)' if old is missing else old!r} -> {'(unset)' if new is missing else new!r}"
            )
    return lines
