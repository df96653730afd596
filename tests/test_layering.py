"""Imports flow one way: a lower layer of the package never imports a higher one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "es_lightning"
LAYERS = [
    "io",
    "stopping",
    "models",
    "memory",
    "data",
    "alignment",
    "steering",
    "callbacks",
    "evaluation",
    "run",
    "export",
    "prediction",
    "preflight",
    "module",
    "console",
    "cli",
    "pipeline",
]


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "es_lightning" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1])


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path):
    relative = path.relative_to(PACKAGE)
    own = LAYERS.index(relative.parts[0].removesuffix(".py"))
    upward = [m for m in imports(path) if (layer := layer_of(m)) is not None and layer > own]
    assert not upward, f"{relative} (layer {LAYERS[own]}) imports higher layers: {upward}"


def test_every_package_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert folders | modules == set(LAYERS)
