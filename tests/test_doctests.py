"""The docstring examples (``>>>``) of the project's modules run and pass; docs tables of
defaults match the code.

Only modules whose source holds an example are imported (found by reading the files),
so collecting this test imports no flow module that has none and starts nothing.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import re
import time
from pathlib import Path

import pytest

from events.simulator import SimConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("events", "state", "models", "operators", "flows")


def _modules_with_examples() -> list[str]:
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            if ">>> " in path.read_text():
                out.append(f"{package}.{path.stem}")
    return out


MODULES = _modules_with_examples()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    module = importlib.import_module(name)
    start = time.perf_counter()
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    elapsed = time.perf_counter() - start
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"
    assert elapsed < 5.0, f"{name}: docstring examples took {elapsed:.1f} s; keep them small"


@pytest.mark.parametrize("qualname", [
    "models.rankers:Ranker", "models.rankers:make_ranker", "models.embedding_fm:EmbeddingFM",
    "state.embedding_table:EmbeddingTable", "state.profiles:ProfileStore",
    "state.item_index:ItemIndex", "state.item_index:IndexReader", "state.item_index:IndexConfig",
    "state.snapshot_store:SnapshotStore",
])
def test_public_classes_carry_an_example(qualname: str) -> None:
    module, name = qualname.split(":")
    assert module in MODULES
    doc = getattr(importlib.import_module(module), name).__doc__ or ""
    assert ">>> " in doc, f"{qualname}: add a runnable example (>>>) to its docstring"


def test_simulator_md_lists_every_simconfig_default() -> None:
    text = (ROOT / "docs" / "simulator.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, re.M))
    defaults = {f.name: str(f.default) for f in dataclasses.fields(SimConfig)}
    assert {name: table.get(name) for name in defaults} == defaults
