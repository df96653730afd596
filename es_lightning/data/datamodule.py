"""LightningDataModule serving cached, paired hidden states of an expert and a target model."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from es_lightning.data.cache import PairedLayout, check_cache_dtype, dtype_mismatch
from es_lightning.data.extraction import Extraction
from es_lightning.data.prompts import PromptDataset, PromptSource, collate_prompts
from es_lightning.data.question_table import DataSource, QuestionTable, SplitConfig, read_source
from es_lightning.data.store import CacheStore, LayerRows, PairedStates
from es_lightning.models.capture import Pooling
from es_lightning.models.loading import default_cache_dir, dtype_name
from es_lightning.models.spec import ModelSpec, describe

log = logging.getLogger(__name__)


class QuestionIndices(Dataset):
    """``0..n-1`` as ``{"question": i}`` items: what ``es-lightning test`` iterates over."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: int) -> dict[str, int]:
        return {"question": item}


class PairedHiddenStatesDataModule(L.LightningDataModule):
    """Caches pooled block outputs of BOTH models for the same labelled examples and serves them in batches.

    Batches are ``{"expert": [B, L_E, d_E], "target": [B, L_T, d_T], "label": [B], "index": [B]}`` in float32,
    with only the layers the module's ``batch_layers`` names when it has one (else every cached layer).
    The training loader serves the optional ``alignment_data`` (unlabelled texts, label -1) when given,
    else the labelled train split. Extraction runs one model at a time (:mod:`es_lightning.data.extraction`)
    in batches of at most ``extract_batch_size`` texts and ``extract_batch_tokens`` padded tokens (null: rows
    only); under DDP each rank extracts its share of the shards once. The cache stores states in
    ``cache_dtype`` (``float32``, ``bfloat16`` or ``float16``: half the disk) and every read is memory-mapped and
    returns float32: :meth:`states` reads the rows and layers a stage asks for, never the whole cache.

    Long because: it is Lightning's one data object (constructor options, setup, four loaders, its state in the
    checkpoint) and the typed readers every step uses (:meth:`states`, :meth:`layer_rows`, :attr:`question_table`);
    reading and splitting the data lives in :mod:`~es_lightning.data.question_table`, the cache in ``cache.py``,
    ``extraction.py`` and ``store.py``.
    """

    def __init__(
        self,
        expert: ModelSpec,
        target: ModelSpec,
        data: DataSource,
        alignment_data: DataSource | None = None,
        splits: SplitConfig = SplitConfig(),
        pooling: Pooling = "last",
        batch_size: int = 64,
        extract_batch_size: int = 16,
        extract_batch_tokens: int | None = 4096,
        cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        shard_size: int = 256,
        cache_dir: str | None = None,
        num_workers: int = 0,
        progress: bool = True,
        predict_data: PromptSource | None = None,
        predict_batch_size: int = 8,
    ):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling={pooling!r} is not supported: use 'last' or 'mean'.")
        if batch_size < 1 or extract_batch_size < 1:
            raise ValueError("batch_size and extract_batch_size must be positive integers.")
        if extract_batch_tokens is not None and extract_batch_tokens < 1:
            raise ValueError(f"extract_batch_tokens must be a positive integer or null, got {extract_batch_tokens}.")
        check_cache_dtype(cache_dtype)
        self.expert_spec = expert
        self.target_spec = target
        self.source = data
        self.alignment_source = alignment_data
        self.split_config = splits
        self.pooling = pooling
        self.batch_size = batch_size
        self.extract_batch_size = extract_batch_size
        self.extract_batch_tokens = extract_batch_tokens
        self.cache_dtype = cache_dtype
        self.shard_size = shard_size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.progress = progress
        self.predict_source = predict_data
        self.predict_batch_size = predict_batch_size
        self.prompts: PromptDataset | None = None
        self.layout: PairedLayout | None = None
        self._table: QuestionTable | None = None
        self.store: CacheStore | None = None
        self.alignment_store: CacheStore | None = None
        self.cache_keys: dict[str, str] = {}

    # ----------------------------------------------------------------------------------- examples
    def _prepare_examples(self) -> None:
        self._table = QuestionTable.build(self.source, self.split_config, self.cache_dir)

    @property
    def question_table(self) -> QuestionTable:
        """The questions and their cache rows per split (read at ``prepare_layout``/``setup``)."""
        if self._table is None:
            raise RuntimeError("The data module has not read its data yet: call prepare_layout() or setup() first.")
        return self._table

    # ------------------------------------------------------------------------------------ caching
    def _extraction(self) -> Extraction:
        trainer = self.trainer
        return Extraction(
            self.expert_spec,
            self.target_spec,
            self.built_layout,
            self.cache_dir,
            self.shard_size,
            self.cache_dtype,
            self.extract_batch_size,
            self.extract_batch_tokens,
            self.progress,
            device=trainer.strategy.root_device if trainer else "cpu",
            rank=trainer.global_rank if trainer else 0,
            world=trainer.world_size if trainer else 1,
        )

    @property
    def built_layout(self) -> PairedLayout:
        """The cache layout (models, captured layers, pooling); an error before :meth:`prepare_layout` or ``setup``."""
        if self.layout is None:
            raise RuntimeError("The data module's layout is not known yet: call prepare_layout() or setup() first.")
        return self.layout

    def prepare_layout(self) -> PairedLayout:
        """Read the examples and both models' configs (no weights): what checks need before any extraction."""
        if self.layout is None:
            self._prepare_examples()
            expert = describe(self.expert_spec, self.cache_dir, who="expert")
            target = describe(self.target_spec, self.cache_dir, who="target")
            self.layout = PairedLayout(expert, target, self.pooling)
        return self.layout

    def setup(self, stage: str | None = None) -> None:
        """Read the examples, resolve both models, and build or reuse the caches (prompts only for predict)."""
        if stage == "predict":
            if self.predict_source is None:
                raise ValueError(
                    "`predict` needs prompts: set data.predict_data.path (a JSONL file with a 'prompt' field)."
                )
            self.prompts = PromptDataset(self.predict_source)
            return
        if self.store is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer else "cpu"
        self.expert_spec = replace(
            self.expert_spec, dtype=dtype_name(self.expert_spec.dtype, device)
        )  # `auto` made concrete:
        self.target_spec = replace(
            self.target_spec, dtype=dtype_name(self.target_spec.dtype, device)
        )  # the cache key names it
        self.prepare_layout()
        extraction = self._extraction()
        self.store = extraction.ensure(self.question_table.examples, "labelled")
        self.cache_keys["data"] = self.store.cache.key
        if self.alignment_source is not None:
            align_examples, _ = read_source(self.alignment_source, self.cache_dir)
            self.alignment_store = extraction.ensure(align_examples, "alignment")
            self.cache_keys["alignment"] = self.alignment_store.cache.key

    # --------------------------------------------------------------------------------- accessors
    def _rows(self, split: str | Sequence[int]) -> tuple[CacheStore, list[int]]:
        """The store and rows of a split name (``train``/``val``/``test``/``alignment``) or of explicit example rows."""
        if self.store is None:
            raise RuntimeError("The paired cache is not set up: call datamodule.setup('fit') first.")
        if split == "alignment":
            if self.alignment_store is not None:
                return self.alignment_store, list(range(len(self.alignment_store)))
            split = "train"
        if isinstance(split, str):
            splits = self.question_table.split_indices
            if split not in splits:
                raise ValueError(
                    f"Unknown split {split!r}: use one of {list(splits) + ['alignment']} or a list of rows."
                )
            return self.store, list(splits[split])
        return self.store, list(split)

    def states(
        self, split: str | Sequence[int], expert_layers: Sequence[int] = (), target_layers: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """Float32 states of a split (or of example rows) at only the requested layers (block indices, in the given
        order): ``expert [n, len(expert_layers), d_E]`` and ``target [n, len(target_layers), d_T]`` when requested,
        and always ``label [n]``. ``alignment`` is the auto-encoders' data: ``alignment_data`` if set, else train."""
        store, rows = self._rows(split)
        out = {"label": store.labels[torch.as_tensor(rows, dtype=torch.long)]}
        if expert_layers:
            out["expert"] = store.read("expert", rows, expert_layers)
        if target_layers:
            out["target"] = store.read("target", rows, target_layers)
        return out

    def layer_rows(self, split: str | Sequence[int], side: str) -> LayerRows:
        """One side's states of a split (or rows) at every cached layer, read one layer at a time on demand."""
        store, rows = self._rows(split)
        return LayerRows(store, side, rows)

    def split_groups(self, name: str) -> list[str]:
        """The group key (question) of every row of a labelled split, in the order of :meth:`states`."""
        return self.question_table.groups(name)

    def alignment_groups(self) -> list[str]:
        """Group keys of the rows of the ``alignment`` split (each ``alignment_data`` row is its own group)."""
        if self.alignment_store is not None:
            return [f"alignment/{r}" for r in range(len(self.alignment_store))]
        return self.split_groups("train")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Batches of a split with the layers the module's ``batch_layers`` names (e.g. the auto-encoders' trained
        pairs), else every cached layer."""
        store, rows = self._rows(split)
        module = self.trainer.lightning_module if self.trainer else None
        expert_layers, target_layers = getattr(module, "batch_layers", None) or (
            store.layers("expert"),
            store.layers("target"),
        )
        dataset = PairedStates(store, rows, expert_layers, target_layers)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # A DistributedSampler even on one process: its shuffle depends only on (seed, epoch), so a resumed
        # run sees the same batches as an uninterrupted one, and Lightning keeps it as is under DDP.
        sampler: DistributedSampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.split_config.seed, drop_last=False
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("alignment", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Indices into ``all_questions``: the evaluation decides which are tested in which fold."""
        questions = QuestionIndices(len(self.question_table.all_questions))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler: DistributedSampler = DistributedSampler(questions, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(questions, batch_size=self.batch_size, sampler=sampler)

    def require_prompts(self) -> PromptDataset:
        """The prompts ``setup("predict")`` read (an error before)."""
        if self.prompts is None:
            raise RuntimeError("The prompts are read by setup('predict'); call it first.")
        return self.prompts

    def predict_dataloader(self) -> DataLoader:
        """Prompts of ``predict_data`` in input order (under DDP Lightning adds its non-padding predict sampler)."""
        return DataLoader(
            self.require_prompts(),
            batch_size=self.predict_batch_size,
            shuffle=False,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
        )

    def skip_prompts(self, done: Iterable[int]) -> PromptDataset:
        """Leave the prompts whose row numbers are in ``done`` (already written) out of the predict loader; returns
        the prompts left."""
        self.prompts = self.require_prompts().without(done)
        return self.prompts

    # ----------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {
            "cache_keys": dict(self.cache_keys),
            "cache_dtype": self.cache_dtype,
            "layout": self.layout.to_dict() if self.layout else None,
            "expert": asdict(self.expert_spec),
            "target": asdict(self.target_spec),
        }

    def load_state_dict(self, state: dict) -> None:
        """On resume, refuse a checkpoint whose cache (models, layers, data) differs from this run's."""
        if not self.cache_keys or not state.get("cache_keys"):
            return
        saved_dtype = state.get("cache_dtype", "float32")
        if saved_dtype != self.cache_dtype:
            raise dtype_mismatch(
                saved_dtype,
                self.cache_dtype,
                "The checkpoint's paired cache",
                "resume or test with the config the checkpoint was made with, or start a new run without --ckpt_path",
            )
        if state["cache_keys"].get("data") != self.cache_keys.get("data"):
            saved = PairedLayout.from_dict(state["layout"]) if state.get("layout") else None
            detail = ""
            if saved is not None and self.layout is not None:
                detail = f" Checkpoint: {saved.describe()}; this run: {self.layout.describe()}."
            raise ValueError(
                "The checkpoint was trained on a different paired cache (other models or weights, layers, pooling, "
                f"templates or data) than this run's config.{detail} Fix: resume with the config the checkpoint was "
                "made with, or start a new run without --ckpt_path."
            )
