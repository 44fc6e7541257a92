"""The layout keeps its shape: imports point one way, and no room outgrows itself.

`docs/architecture.md` draws the rooms; these checks keep the drawing true.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "disaggd"

#: Which sub-packages each room may import (besides itself and disaggd._compat).
ALLOWED = {
    "topology": set(),
    "observe": set(),
    "supervise": {"topology", "observe"},
    "proxy": {"topology", "observe"},
    "export": {"topology"},
    "daemon": {"topology", "observe", "supervise", "proxy", "export"},
}

#: Limits from issue 10: lines per module, per class, per function. Classes and functions
#: count code lines only (no docstrings, comments or blank lines): documentation is free.
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 500, 300, 60


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "disaggd" and len(parts) > 1:
                rooms.add(parts[1])
            elif parts[0] == "disaggd":  # from disaggd import X
                rooms.update(alias.name for alias in node.names)
    return rooms


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_imports_point_one_way(room: str) -> None:
    for path in sorted((PKG / room).rglob("*.py")):
        others = imported_rooms(path) - {room, "_compat", "__version__"}
        assert others <= ALLOWED[room], f"{path.relative_to(PKG)} imports {others - ALLOWED[room]}"


def code_lines(text: str, tree: ast.Module) -> set[int]:
    """Line numbers that hold code: not blank, not a comment, not a docstring."""
    lines = {
        n
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    }
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            doc = body[0].value
            if isinstance(doc, ast.Constant) and isinstance(doc.value, str):
                lines -= set(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    return lines


def test_no_room_outgrows_itself() -> None:
    too_big = []
    for path in modules():
        text = path.read_text()
        rel = path.relative_to(PKG)
        if len(text.splitlines()) > MAX_MODULE:
            too_big.append(f"{rel}: {len(text.splitlines())} lines")
        tree = ast.parse(text)
        code = code_lines(text, tree)
        for node in ast.walk(tree):
            limit = None
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION
            if limit is not None:
                span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
                size = len(code.intersection(span))
                if size > limit:
                    too_big.append(f"{rel}:{node.lineno} {node.name}: {size} code lines")
    assert not too_big, "\n".join(too_big)
