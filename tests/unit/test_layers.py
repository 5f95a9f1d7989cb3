"""The packages' dependencies point one way (ARCHITECTURE.md): `trainer` → `workers` →
nothing of ours; `cluster` is a leaf; a worker reaches into `cluster` only for resource
helpers. Checked on the source, import by import (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {"workers": {"workers", "cluster.resources"}, "cluster": {"cluster"}}
OURS = ("trainer", "workers", "cluster")


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement in the file, absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def allowed(name: str, rules: set[str]) -> bool:
    return any(name == rule or name.startswith(rule + ".") for rule in rules)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_it_may(package):
    broken = {}
    for path in sorted((REPO / package).rglob("*.py")):
        ours = {n for n in imports_of(path) if n.split(".")[0] in OURS}
        wrong = sorted(n for n in ours if not allowed(n, ALLOWED[package]))
        if wrong:
            broken[str(path.relative_to(REPO))] = wrong
    assert not broken, f"imports against ARCHITECTURE.md's direction: {broken}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from trainer.config import Config\n")
    assert "trainer.config" in imports_of(sample)
