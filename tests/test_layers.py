"""Imports go one way: flows -> operators -> models -> state -> events.

A module may import its own package and any package below it, never one above
(functions' local imports included). Bytewax stays out of models/, state/ and events/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"events": 0, "state": 1, "models": 2, "operators": 3, "flows": 4}
"""Package -> height; an import may only go to the same or a lower height."""


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
    return out


def upward_imports(root: Path = ROOT) -> list[str]:
    """Every import from a package to a higher one, as ``file:line -> module``."""
    found = []
    for package, height in LAYERS.items():
        for path in sorted((root / package).rglob("*.py")):
            for module, line in _imports(path):
                top = module.split(".")[0]
                if LAYERS.get(top, -1) > height or (height <= LAYERS["models"]
                                                    and top == "bytewax"):
                    found.append(f"{path.relative_to(root)}:{line} -> {module}")
    return found


def test_imports_go_one_way() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walker itself: a planted upward import and a Bytewax import in state/ are found."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "state" / "bad.py").write_text(
        "def f():\n    from operators.user_shard import UserShard\n")
    (tmp_path / "models" / "glue.py").write_text("import bytewax.operators as op\n")
    (tmp_path / "flows" / "ok.py").write_text("from events.model import Record\n")
    assert upward_imports(tmp_path) == ["state/bad.py:2 -> operators.user_shard",
                                        "models/glue.py:1 -> bytewax.operators"]
