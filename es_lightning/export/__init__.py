"""Export steering vectors to other tools: llama.cpp (gguf), lm-evaluation-harness (lm-eval), folded HF checkpoints."""

from es_lightning.export.source import ExportSource, load_source, resolve_target, steering_deltas

__all__ = ["ExportSource", "load_source", "resolve_target", "steering_deltas"]
