"""The messages from the user shards to the item shards: one small immutable type per kind.

Each carries the ``item_id`` it is routed by (``hash(item_id) mod shards.items``).
They are ``NamedTuple`` s: immutable, typed, cheap to build and pickle (a replay makes
tens of them per feedback), and matched by class in ``ItemShard.process``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from events.model import Feedback, Impression, Item


class Interaction(NamedTuple):
    """A feedback on the item: counts it; a positive also feeds popularity and trending."""

    item_id: str
    ts: int
    """Event time (ms)."""
    positive: bool


class MFStep(NamedTuple):
    """The item half of one MF step (ISGD when ``coef`` is None, else BPR's coefficient)."""

    item_id: str
    ts: int
    user_vec: np.ndarray
    coef: float | None


class CovisPair(NamedTuple):
    """One co-visitation pair for ``item_id``'s row in ``channel`` ('liked' or 'any')."""

    item_id: str
    other: str
    weight: float
    ts: int
    channel: str


class CatalogChange(NamedTuple):
    """An ``item`` event: category and availability."""

    item_id: str
    event: Item


class ProfileEvent(NamedTuple):
    """An impression or feedback for the item's IPS profile."""

    item_id: str
    event: Impression | Feedback


ItemUpdate = Interaction | MFStep | CovisPair | CatalogChange | ProfileEvent

CHANNELS = ("liked", "any")
"""Co-visitation channels: pairs of positives, pairs of any interactions."""
