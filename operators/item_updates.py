"""The messages from the user shards to the item shards: one small immutable type per kind.

Each carries the ``item_id`` it is routed by (``hash(item_id) mod shards.items``).
They are ``NamedTuple`` s: immutable, typed, cheap to build and pickle (a replay makes
several per feedback), and matched by class in ``ItemShard.process``.
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


class CovisPairs(NamedTuple):
    """One interaction's co-visitation pairs ``(row item, neighbour, weight)`` in
    ``channel`` ('liked' or 'any'), in the order ``CoVisitation.pairs_for`` made them.

    The user shard sends one message per interaction and channel; ``route_updates``
    splits it into one per item shard, each with the pairs whose row item the shard owns
    (order kept), its ``item_id`` the row item of its first pair. One message instead of
    one per pair (~80 per MovieLens rating): the pairs are never re-wrapped, and an item
    shard takes them with one ``extend``."""

    item_id: str
    pairs: list[tuple[str, str, float]]
    ts: int
    """Event time (ms) of the interaction."""
    channel: str


class CatalogChange(NamedTuple):
    """An ``item`` event: category and availability."""

    item_id: str
    event: Item


class ProfileEvent(NamedTuple):
    """An impression or feedback for the item's IPS profile."""

    item_id: str
    event: Impression | Feedback


ItemUpdate = Interaction | MFStep | CovisPairs | CatalogChange | ProfileEvent

CHANNELS = ("liked", "any")
"""Co-visitation channels: pairs of positives, pairs of any interactions."""
