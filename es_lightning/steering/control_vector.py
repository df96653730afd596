"""llama.cpp control vectors: a steering bundle written as a control-vector GGUF, and such a file read back.

llama.cpp adds tensor ``direction.N`` to the output of block ``N`` counted from 0 (the same index as
``model.layers[N]`` in transformers and ``blk.N`` in GGUF), at every position; it rejects ``direction.0``, so block 0
cannot be exported (see :mod:`es_lightning.steering.bundle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from es_lightning.io import atomic_write_with

if TYPE_CHECKING:
    from es_lightning.steering.bundle import SteeringBundle


def export_control_vector(
    bundle: SteeringBundle, path: str | Path, coefficient: float, model_hint: str | None = None
) -> Path:
    """Write ``bundle`` as a llama.cpp control vector (see :meth:`SteeringBundle.export_gguf`); return the path."""
    import gguf

    if not math.isfinite(coefficient):
        raise ValueError(f"The export coefficient must be a finite number, got {coefficient!r}.")
    if 0 in bundle.vectors:
        raise ValueError(
            "This bundle steers block 0, which llama.cpp control vectors cannot address (it rejects "
            "'direction.0'). Drop layer 0 from the bundle or steer with es-lightning's own hooks."
        )
    hint = model_hint or bundle.target.architecture
    if not hint:
        raise ValueError("No model_hint: the target identity has no architecture, so pass model_hint='llama' etc.")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", len(bundle.vectors))
        for layer, vector in bundle.vectors.items():
            direction = (vector.double() * (coefficient * bundle.norms[layer])).float().numpy()
            writer.add_tensor(f"direction.{layer}", direction)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = Path(path)
    atomic_write_with(path, write)
    return path


@dataclass
class ControlVector:
    """A llama.cpp control vector read back from GGUF: ``directions[j]`` steers 0-based block ``j``."""

    directions: dict[int, torch.Tensor]
    model_hint: str
    layer_count: int


def load_control_vector_gguf(path: str | Path) -> ControlVector:
    """Read a llama.cpp control-vector GGUF (as written by :meth:`SteeringBundle.export_gguf`)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    if "general.architecture" not in fields or fields["general.architecture"].contents() != "controlvector":
        raise ValueError(
            f"{str(path)!r} is a GGUF file but not a control vector (general.architecture is not 'controlvector')."
        )
    directions = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ValueError(f"{str(path)!r} holds tensor {tensor.name!r}; a control vector has only 'direction.N'.")
        directions[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    hint, count = fields.get("controlvector.model_hint"), fields.get("controlvector.layer_count")
    return ControlVector(  # llama.cpp ignores both metadata keys, so files without them are accepted
        directions=dict(sorted(directions.items())),
        model_hint=hint.contents() if hint else "",
        layer_count=int(count.contents()) if count else len(directions),
    )
