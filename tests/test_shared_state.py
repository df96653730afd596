"""Issue 17's greps, made executable: no code sets attributes of the LightningModule or of the data module from
outside them (callbacks and stages hand results over through methods), and no value of the layer pairing, the
vectors or the coefficients crosses functions or dataclasses as ``dict[str, Any]``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "es_lightning"
FILES = sorted(PACKAGE.rglob("*.py"))
HOLDERS = {"pl_module", "module", "datamodule", "model"}  # names that hold the module or the data module
CARRIERS = re.compile(r"pair|vector|coefficient|bundle|mi_|chosen|direction")  # names of what must stay typed


def attribute_assignments(tree: ast.AST) -> list[str]:
    """``name.attr`` for every assignment (or ``setattr``) to an attribute of a name in :data:`HOLDERS`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(node.args[0], "<setattr>", ast.Store())] if node.args else []
        else:
            continue
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id in HOLDERS:
                    found.append(f"{leaf.value.id}.{leaf.attr}")
    return found


def untyped_carriers(tree: ast.AST) -> list[str]:
    """Arguments, returns and fields named like pairs, vectors or coefficients annotated with ``Any``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            named = [(a.arg, a.annotation) for a in node.args.args + node.args.kwonlyargs]
            named.append((node.name, node.returns))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, (ast.Name, ast.Attribute)):
            target = node.target
            named = [(target.id if isinstance(target, ast.Name) else target.attr, node.annotation)]
        else:
            continue
        for name, annotation in named:
            if annotation is not None and CARRIERS.search(name) and "Any" in ast.unparse(annotation):
                found.append(f"{name}: {ast.unparse(annotation)} (line {annotation.lineno})")
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_code_sets_attributes_of_the_module_or_the_data_module(path):
    assert attribute_assignments(ast.parse(path.read_text())) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_pairs_vectors_and_coefficients_are_never_dict_of_any(path):
    assert untyped_carriers(ast.parse(path.read_text())) == []


def test_the_checks_find_what_they_should():
    planted = ast.parse(
        "def on_fit_end(trainer, pl_module):\n"
        "    pl_module.pairing_result = 1\n"
        "    setattr(datamodule, 'prompts', [])\n"
        "    module.extra['bundles'] += {}\n"
        "def vectors_of(fold) -> dict[str, Any]: ...\n"
        "class Plan:\n"
        "    chosen: dict[str, Any]\n"
    )
    assert sorted(attribute_assignments(planted)) == [
        "datamodule.<setattr>",
        "module.extra",
        "pl_module.pairing_result",
    ]
    assert [entry.split(":")[0] for entry in untyped_carriers(planted)] == ["vectors_of", "chosen"]
