"""The package's shape: no import cycles, and no knowledge of a model family outside families/.

Both read the source with ``ast``: every ``import`` and ``from ... import`` statement counts,
also those inside functions, since a cycle through a deferred import is still a cycle of design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lisa_control"


def module_name(path: Path) -> str:
    parts = ["lisa_control", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The package modules ``path`` imports: ``from .x import y`` names ``x.y`` when that is a
    module of its own, else ``x``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("lisa_control"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lisa_control"))
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_walker_sees_relative_imports_and_finds_a_planted_cycle():
    graph = {m: imported_modules(p) for m, p in MODULES.items()}
    assert "lisa_control.core.errors" in graph["lisa_control.core.hooks"]
    assert "lisa_control.families.unet_split" in graph["lisa_control.families.unet"]
    graph["lisa_control.core.errors"] = {"lisa_control.core.hooks"}
    assert find_cycle(graph) is not None


def test_the_package_has_no_import_cycles():
    graph = {m: imported_modules(p) for m, p in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_core_and_regularizers_do_not_import_the_layers_above_them():
    above = ("lisa_control.families", "lisa_control.training", "lisa_control.eval")
    above += ("lisa_control.cli",)
    for name, path in MODULES.items():
        if name.startswith(("lisa_control.core", "lisa_control.regularizers")):
            wrong = [m for m in imported_modules(path) if m.startswith(above)]
            assert not wrong, f"{name} imports {wrong}"


# ----------------------------------------------------------------------------- family knowledge

# diffusers model classes: an isinstance test on one of them is a branch on a family.
MODEL_CLASS_SUFFIXES = ("Model", "Model2D", "Transformer2DModel", "Adapter", "Branch")


def family_branches(path: Path) -> list[str]:
    """Lines of ``path`` that compare something named ``family`` with a literal, or test an
    object against a model or branch class."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            names = [ast.unparse(x) for x in [node.left, *node.comparators]]
            literal = any(isinstance(x, ast.Constant) for x in [node.left, *node.comparators])
            literal |= any(isinstance(x, (ast.Tuple, ast.List, ast.Set)) for x in node.comparators)
            if literal and any(n.split(".")[-1] in ("family", "family_name") for n in names):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance":
            classes = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
            if any(part.strip("() ").endswith(MODEL_CLASS_SUFFIXES) for part in classes.split(",")):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_family_check_catches_a_planted_branch(tmp_path):
    planted = tmp_path / "x.py"
    planted.write_text(
        "if model.family == 'flux':\n    pass\n"
        "ok = isinstance(branch, (SD3ControlNetBranch, FluxControlNetBranch))\n"
        "fine = isinstance(value, (list, tuple))\n"
    )
    assert len(family_branches(planted)) == 2


@pytest.mark.parametrize(
    "name", sorted(m for m in MODULES if not m.startswith("lisa_control.families"))
)
def test_no_family_specific_branch_outside_families(name):
    assert family_branches(MODULES[name]) == []
