"""The house rules on size, made executable: no module over 350 lines, no class over 200, no function over 60,
unless its docstring says why (a line starting ``Long because:``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "es_lightning"
FILES = sorted(PACKAGE.rglob("*.py"))
LIMITS = {ast.ClassDef: 200, ast.FunctionDef: 60, ast.AsyncFunctionDef: 60}
MODULE_LIMIT = 350
REASON = "Long because:"


def _explained(node: ast.AST) -> bool:
    doc = (
        ast.get_docstring(node)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        else None
    )
    return bool(doc) and any(line.strip().startswith(REASON) for line in doc.splitlines())


def oversized(path: Path) -> list[str]:
    """``"name: N lines"`` for each piece of ``path`` over its limit without a stated reason."""
    text = path.read_text()
    tree = ast.parse(text)
    found = []
    if len(text.splitlines()) > MODULE_LIMIT and not _explained(tree):
        found.append(f"module: {len(text.splitlines())} lines")
    for node in ast.walk(tree):
        limit = LIMITS.get(type(node))
        if limit is None:
            continue
        size = node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]
        if size > limit and not _explained(node):
            found.append(f"{node.name}: {size} lines (limit {limit})")  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_piece_is_over_its_size_limit_without_a_reason(path):
    assert oversized(path) == [], f"split it, or state '{REASON} ...' in its docstring"


def test_the_rule_finds_what_it_should(tmp_path):
    body = "\n".join(f"    x{k} = {k}" for k in range(61))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    '''{REASON} a table.'''\n{body}\n")
    assert oversized(tmp_path / "long.py") == ["f: 62 lines (limit 60)"]
