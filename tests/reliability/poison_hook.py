"""A serving hook that fails on one user: a stand-in for any bug that raises on one event."""

from __future__ import annotations

from typing import Any

POISON_USER = "poison-user"


def refuse_poison(request: Any, candidates: list[Any]) -> list[Any]:
    """``after_retrieval`` hook: raises for ``POISON_USER``, passes everything else."""
    if request.user_id == POISON_USER:
        raise RuntimeError(f"hook refuses {POISON_USER}")
    return candidates
