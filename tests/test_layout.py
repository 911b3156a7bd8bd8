"""The training package and the CLI stay readable: short functions, and every module says
its one job in a docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lisa_control"
CHECKED = [PACKAGE / "training", PACKAGE / "cli"]
MAX_LINES = 80


def modules():
    return sorted(p for root in CHECKED for p in root.rglob("*.py"))


def test_training_functions_are_short():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({span})")
    assert not long, f"functions over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_has_a_docstring(path):
    assert ast.get_docstring(ast.parse(path.read_text())), path
