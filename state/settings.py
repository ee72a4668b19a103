"""Documented config fields: each component declares its settings next to its code.

``flows.config`` composes these dataclasses into the flow's config and renders the
reference from the ``doc`` metadata, so a key is described exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its documentation (with its unit) in metadata."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})
