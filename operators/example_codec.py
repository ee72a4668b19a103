"""The wire form of training examples: features grouped by name prefix.

Examples leave the flow (``examples`` topic or file) with their ``features`` nested
by dotted name prefix, runs of consecutive names sharing a first segment written once::

    {"user.clicks.1h": 2.0, "user.clicks.1d": 3.0, "u:country": "US", "pop": 1.5}
    -> {"user.": {"clicks.": {"1h": 2.0, "1d": 3.0}}, "u:country": "US", "pop": 1.5}

A key ending in ``.`` with a dict value is a group; no feature has a dict value (the
model ignores them and ``models.features.compact`` drops them), so ``unpack_example``
restores the exact dict the flow had, keys in the same order (River sums a linear
model's terms in key order: the trainer flow then learns bit for bit what the in-flow
trainer learns). Every other field of the record is unchanged, and a record already
flat unpacks to itself. Readers: ``flows/trainer.py``, ``streamrec tap``.
"""

from __future__ import annotations

from typing import Any

from events.model import Record


def pack_example(example: Record) -> Record:
    """``example`` with its ``features`` grouped by prefix (a new record; the input is kept)."""
    features = example.get("features")
    if not features or not any("." in name for name in features):
        return example  # nothing to group
    try:
        nested = _nest(list(features.items()))
    except _Clash:
        return example
    out = dict(example)
    out["features"] = nested
    return out


def unpack_example(record: Record) -> Record:
    """The example ``pack_example`` was given (flat records are returned as they are)."""
    features = record.get("features")
    if not features or not any(type(v) is dict for v in features.values()):
        return record
    flat: dict[str, Any] = {}
    _flatten(features, "", flat)
    out = dict(record)
    out["features"] = flat
    return out


def _nest(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Group consecutive names with the same first dotted segment (two or more) under
    ``"<segment>."``, recursively; a segment that comes back later stays flat there."""
    out: dict[str, Any] = {}
    i, n = 0, len(items)
    while i < n:
        name, value = items[i]
        head, dot, _ = name.partition(".")
        j = i + 1
        if dot:
            while j < n and items[j][0].startswith(head + ".") and items[j][0] != head + ".":
                j += 1
        group = head + "."
        if dot and j - i > 1 and group not in out:
            out[group] = _nest([(k[len(group):], v) for k, v in items[i:j]])
            i = j
        else:
            if name in out:
                raise _Clash(name)
            out[name] = value
            i += 1
    return out


class _Clash(Exception):
    """A name equal to a group key (a name ending in ``.``): such features stay flat."""


def _flatten(nested: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in nested.items():
        if type(value) is dict and key.endswith("."):
            _flatten(value, prefix + key, out)
        else:
            out[prefix + key] = value
