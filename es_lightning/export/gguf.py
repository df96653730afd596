"""``gguf``: the llama.cpp control vector, via the bundle's own writer. llama.cpp loads it with
``llama-completion ... --control-vector-scaled FILE:SCALE`` (SCALE multiplies the exported coefficient; 1.0 is
as exported) or ``--control-vector FILE`` (scale 1).

``direction.j`` is ``coefficient * norms[j] * vectors[j]`` and llama.cpp adds it to the output of 0-based
block ``j`` at every position (the same block index as ``model.layers[j]``; see
:mod:`es_lightning.steering.bundle`). ``benchmarks/bench_llamacpp.py`` checks that convention on llama.cpp
itself.
"""

from __future__ import annotations

from pathlib import Path

from es_lightning.export.source import ExportSource, check_output


def export_gguf(source: ExportSource, path: str | Path, overwrite: bool = False, model_hint: str | None = None) -> Path:
    """Write ``source`` as a llama.cpp control-vector GGUF at ``path`` (atomically); return the path."""
    path = check_output(path, overwrite)
    return source.bundle.export_gguf(path, source.coefficient, model_hint=model_hint)
