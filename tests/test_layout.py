"""Files along their seams: the shape the house style asks of production modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the agent, the controller and the shared kernel; sim/ is checked once it is reshaped
PRODUCTION = sorted(p for d in ("agent", "controller", "wabridge")
                    for p in (REPO / d).rglob("*.py"))
MAX_LINES = 600


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(REPO)))
def test_no_test_machinery_in_production_code(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m == "unittest" or m.startswith("unittest.")}


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(REPO)))
def test_a_long_module_says_why_at_its_top(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"Over {MAX_LINES} lines because" in doc, f"{lines} lines and no reason"
