"""LightningDataModule serving cached, paired hidden states of an expert and a target model."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from es_lightning.data.adapters import adapt_rows
from es_lightning.data.cache import PairedCache, PairedLayout, build_shards, cache_key, examples_fingerprint
from es_lightning.data.examples import (
    Example,
    ExampleFormat,
    Question,
    check_two_classes,
    examples_from_questions,
    examples_from_text_rows,
    questions_from_rows,
)
from es_lightning.data.prompts import PromptDataset, PromptSource, collate_prompts
from es_lightning.data.resolve import resolve_data_path
from es_lightning.data.sources import load_records, require_columns, rows
from es_lightning.data.splits import SPLITS, group_split
from es_lightning.io import ensure_writable_dir
from es_lightning.models.capture import capture_texts
from es_lightning.models.loading import LoadedModel, default_cache_dir, dtype_name, load_model
from es_lightning.models.spec import ModelSpec, describe

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """Where records come from: a local .jsonl/.json/.csv/.parquet path or a ``datasets`` id, and their format.

    ``adapter`` names a row adapter (:mod:`es_lightning.data.adapters`, e.g. ``gsm8k_mc``) applied before the
    format; ``limit`` keeps the first rows only (after adapting).
    """

    path: str
    name: str | None = None
    split: str = "train"
    format: ExampleFormat = field(default_factory=ExampleFormat)
    adapter: str | None = None
    adapter_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None


@dataclass
class SplitConfig:
    """Train/val/test by group-wise fractions with a seed, or from separate files (``val_path``/``test_path``)."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    val_path: str | None = None
    test_path: str | None = None


class PairedStates(Dataset):
    """Rows of a paired cache as dicts ``{"expert", "target", "label", "index"}``."""

    def __init__(self, tensors: dict[str, torch.Tensor], indices: list[int]):
        self.tensors = tensors
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        i = self.indices[item]
        return {"expert": self.tensors["expert"][i], "target": self.tensors["target"][i], "label": self.tensors["label"][i], "index": i}


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

    Batches are ``{"expert": [B, L_E, d_E], "target": [B, L_T, d_T], "label": [B], "index": [B]}`` in float32.
    The training loader serves the optional ``alignment_data`` (unlabelled texts, label -1) when given,
    else the labelled train split. Under DDP each rank extracts its share of the shards once; every rank
    then reads the whole cache.
    """

    def __init__(
        self,
        expert: ModelSpec,
        target: ModelSpec,
        data: DataSource,
        alignment_data: DataSource | None = None,
        splits: SplitConfig = SplitConfig(),
        pooling: Literal["last", "mean"] = "last",
        batch_size: int = 64,
        extract_batch_size: int = 16,
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
        self.expert_spec = expert
        self.target_spec = target
        self.source = data
        self.alignment_source = alignment_data
        self.split_config = splits
        self.pooling = pooling
        self.batch_size = batch_size
        self.extract_batch_size = extract_batch_size
        self.shard_size = shard_size
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.progress = progress
        self.predict_source = predict_data
        self.predict_batch_size = predict_batch_size
        self.prompts: PromptDataset | None = None
        self.layout: PairedLayout | None = None
        self.examples: list[Example] = []
        self.questions: dict[str, list[Question]] = {}
        self.all_questions: list[Question] = []  # every split's questions, train then val then test
        self.question_rows: list[list[int]] = []  # example rows of each question in all_questions
        self.question_split: dict[str, list[int]] = {}  # indices into all_questions per split
        self.split_indices: dict[str, list[int]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.alignment_tensors: dict[str, torch.Tensor] | None = None
        self.cache_keys: dict[str, str] = {}
        self._loaded: dict[str, LoadedModel] = {}

    # ----------------------------------------------------------------------------------- examples
    def _read(self, source: DataSource) -> tuple[list[Example], list[Question]]:
        source = replace(source, path=resolve_data_path(source.path, cache_dir=self.cache_dir))
        table = load_records(source.path, source.split, source.name)
        fmt = source.format
        if source.adapter:
            records = adapt_rows(rows(table), source.adapter, **source.adapter_options)
        else:
            require_columns(table, fmt.required_columns(), source.path)
            records = rows(table)
        if source.limit is not None:
            if source.limit < 1:
                raise ValueError(f"data limit must be >= 1 or null, got {source.limit}.")
            records = records[: source.limit]
        if fmt.kind == "multiple_choice":
            questions = questions_from_rows(records, fmt, source.path)
            return examples_from_questions(questions, fmt), questions
        return examples_from_text_rows(records, fmt, source.path), []

    def _prepare_examples(self) -> None:
        examples, questions = self._read(self.source)
        cfg = self.split_config
        if cfg.val_path or cfg.test_path:
            parts = {"train": (examples, questions)}
            for name, path in (("val", cfg.val_path), ("test", cfg.test_path)):
                if path:
                    parts[name] = self._read(replace(self.source, path=path, limit=None))
            self.examples, self.split_indices, self.questions, offset = [], {}, {}, 0
            for name in SPLITS:
                part_examples, part_questions = parts.get(name, ([], []))
                self.examples.extend(part_examples)
                self.split_indices[name] = list(range(offset, offset + len(part_examples)))
                self.questions[name] = part_questions
                offset += len(part_examples)
            groups = {name: {self.examples[i].group for i in idx} for name, idx in self.split_indices.items()}
            shared = (groups["train"] & groups["val"]) | (groups["train"] & groups["test"]) | (groups["val"] & groups["test"])
            if shared:
                raise ValueError(f"Questions/groups {sorted(shared)[:5]} appear in more than one split file. Remove the overlap.")
        else:
            self.examples = examples
            self.split_indices = group_split([e.group for e in examples], cfg.val_fraction, cfg.test_fraction, cfg.seed)
            by_group = {q.group: [] for q in questions}
            for q in questions:
                by_group[q.group].append(q)
            self.questions = {
                name: [q for g in dict.fromkeys(self.examples[i].group for i in idx) for q in by_group.get(g, [])]
                for name, idx in self.split_indices.items()
            }
        self.all_questions = [q for name in SPLITS for q in self.questions.get(name, [])]
        rows_of: dict[str, list[int]] = {}
        for index, example in enumerate(self.examples):
            rows_of.setdefault(example.id.rsplit("/", 1)[0], []).append(index)
        self.question_rows = [rows_of.get(q.id, []) for q in self.all_questions]
        offset, self.question_split = 0, {}
        for name in SPLITS:
            count = len(self.questions.get(name, []))
            self.question_split[name] = list(range(offset, offset + count))
            offset += count
        labels = [e.label for e in self.examples]
        if self.source.format.label_field or self.source.format.kind == "multiple_choice":
            check_two_classes([labels[i] for i in self.split_indices["train"]], "train split")
            for name in ("val", "test"):
                present = {labels[i] for i in self.split_indices[name]}
                if len(present) == 1:
                    log.warning(
                        "The %s split has labels of only one class (%s): label-based results on it (e.g. `test` with "
                        "folds: null) would be meaningless. Use a larger %s fraction, another split seed, or rebalance "
                        "the data.", name, sorted(present), name,
                    )

    # ------------------------------------------------------------------------------------ caching
    def _model(self, side: str) -> LoadedModel:
        if side not in self._loaded:
            spec = self.expert_spec if side == "expert" else self.target_spec
            device = self.trainer.strategy.root_device if self.trainer else "cpu"
            self._loaded[side] = load_model(spec.name, self.cache_dir, spec.dtype, device=device)
        return self._loaded[side]

    def _extract(self, side: str, examples: list[Example], on_batch) -> torch.Tensor:
        from es_lightning.models.prompting import render_example

        spec = self.expert_spec if side == "expert" else self.target_spec
        info = self.layout.expert if side == "expert" else self.layout.target
        loaded = self._model(side)
        texts = [render_example(loaded.tokenizer, e.prompt, e.completion, spec.chat_template) for e in examples]
        states, truncated = capture_texts(
            loaded.model, loaded.tokenizer, texts, list(info.layers), self.pooling, spec.max_length,
            self.extract_batch_size, add_special_tokens=not spec.chat_template, block_path=spec.block_path,
            on_batch=on_batch,
        )
        if truncated:
            log.warning(
                "%d of %d texts exceed %s max_length=%d tokens for %s and were truncated from the left "
                "(raise max_length to keep them whole).", truncated, len(texts), side, spec.max_length, spec.name,
            )
        return states

    def _ensure_cache(self, examples: list[Example], what: str) -> tuple[dict[str, torch.Tensor], str]:
        key = cache_key(self.layout, self.expert_spec, self.target_spec, examples_fingerprint(examples))
        cache = PairedCache(self.cache_dir, key, len(examples), self.shard_size, self.layout)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        missing = cache.missing_shards()
        mine = [s for s in missing if s % world == rank]
        if missing:
            if rank == 0:
                ensure_writable_dir(cache.directory.parent, min_free_bytes=self._estimate_bytes(len(examples)), what="cache")
                cache.write_meta({"what": what})
            todo = sum(len(cache.shard_rows(s)) for s in mine) * 2
            with tqdm(total=todo, desc=f"Extracting {what} hidden states (rank {rank})", disable=not self.progress or todo == 0, unit="text") as bar:
                build_shards(cache, mine, examples, self._extract, bar.update, rank=rank)
        if world > 1:
            self.trainer.strategy.barrier()
        if rank == 0:
            state = "built" if len(missing) == cache.n_shards else f"resumed ({len(missing)} of {cache.n_shards} shards built)" if missing else "reused"
            log.info("Paired %s cache %s: %s (%d examples)", what, state, cache.directory, len(examples))
        still = cache.missing_shards()
        if still:
            raise RuntimeError(f"Cache shards {still} are still missing after extraction in {cache.directory}; check the logs of every rank.")
        return cache.load(), key

    def _estimate_bytes(self, n: int) -> int:
        per_row = len(self.layout.expert.layers) * self.layout.expert.hidden_size + len(self.layout.target.layers) * self.layout.target.hidden_size
        return int(n * per_row * 4 * 1.1)

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
                raise ValueError("`predict` needs prompts: set data.predict_data.path (a JSONL file with a 'prompt' field).")
            self.prompts = PromptDataset(self.predict_source)
            return
        if self.tensors:
            return
        device = self.trainer.strategy.root_device if self.trainer else "cpu"
        self.expert_spec = replace(self.expert_spec, dtype=dtype_name(self.expert_spec.dtype, device))  # `auto` made concrete:
        self.target_spec = replace(self.target_spec, dtype=dtype_name(self.target_spec.dtype, device))  # the cache key names it
        self.prepare_layout()
        self.tensors, self.cache_keys["data"] = self._ensure_cache(self.examples, "labelled")
        if self.alignment_source is not None:
            align_examples, _ = self._read(self.alignment_source)
            self.alignment_tensors, self.cache_keys["alignment"] = self._ensure_cache(align_examples, "alignment")
        self._loaded.clear()  # free both models: everything downstream reads the cache

    # --------------------------------------------------------------------------------- accessors
    def split(self, name: str) -> dict[str, torch.Tensor]:
        """All cached tensors of one labelled split (``train``/``val``/``test``)."""
        index = torch.tensor(self.split_indices[name], dtype=torch.long)
        return {key: value[index] for key, value in self.tensors.items()}

    def split_groups(self, name: str) -> list[str]:
        """The group key (question) of every row of a labelled split, in the order of :meth:`split`."""
        return [self.examples[i].group for i in self.split_indices[name]]

    def alignment_groups(self) -> list[str]:
        """Group keys of the rows of :meth:`alignment_split` (each ``alignment_data`` row is its own group)."""
        if self.alignment_tensors is not None:
            return [f"alignment/{r}" for r in range(len(self.alignment_tensors["label"]))]
        return self.split_groups("train")

    def alignment_split(self) -> dict[str, torch.Tensor]:
        """The tensors that train the auto-encoders: ``alignment_data`` if configured, else the train split."""
        return self.alignment_tensors if self.alignment_tensors is not None else self.split("train")

    def _loader(self, tensors: dict[str, torch.Tensor], indices: list[int], shuffle: bool) -> DataLoader:
        dataset = PairedStates(tensors, indices)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # A DistributedSampler even on one process: its shuffle depends only on (seed, epoch), so a resumed
        # run sees the same batches as an uninterrupted one, and Lightning keeps it as is under DDP.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.split_config.seed, drop_last=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        if self.alignment_tensors is not None:
            return self._loader(self.alignment_tensors, list(range(len(self.alignment_tensors["label"]))), True)
        return self._loader(self.tensors, self.split_indices["train"], True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.tensors, self.split_indices["val"], False)

    def test_dataloader(self) -> DataLoader:
        """Indices into ``all_questions``: the evaluation decides which are tested in which fold."""
        questions = QuestionIndices(len(self.all_questions))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = DistributedSampler(questions, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(questions, batch_size=self.batch_size, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        """Prompts of ``predict_data`` in input order (under DDP Lightning adds its non-padding predict sampler)."""
        return DataLoader(self.prompts, batch_size=self.predict_batch_size, shuffle=False, collate_fn=collate_prompts,
                          num_workers=self.num_workers)

    # ----------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        return {"cache_keys": dict(self.cache_keys), "layout": self.layout.to_dict() if self.layout else None,
                "expert": asdict(self.expert_spec), "target": asdict(self.target_spec)}

    def load_state_dict(self, state: dict) -> None:
        """On resume, refuse a checkpoint whose cache (models, layers, data) differs from this run's."""
        if not self.cache_keys or not state.get("cache_keys"):
            return
        if state["cache_keys"].get("data") != self.cache_keys.get("data"):
            saved = PairedLayout.from_dict(state["layout"]) if state.get("layout") else None
            detail = ""
            if saved is not None and self.layout is not None:
                detail = (f" Checkpoint: expert {saved.expert.name} layers {list(saved.expert.layers)}, target "
                          f"{saved.target.name} layers {list(saved.target.layers)}; this run: expert "
                          f"{self.layout.expert.name} layers {self.layout.expert_layers}, target "
                          f"{self.layout.target.name} layers {self.layout.target_layers}.")
            raise ValueError(
                "The checkpoint was trained on a different paired cache (other models, layers, pooling, templates "
                f"or data) than this run's config.{detail} Fix: resume with the config the checkpoint was made with, "
                "or start a new run without --ckpt_path."
            )
