"""Frequency capping of unclicked repeats: how often each user was shown each item.

The standard frequency cap of ad and feed serving, per user shard: an item shown to a
user at least ``shows`` times without the user ever interacting with it is kept out of
that user's answers (``serving.repeat``'s neighbour ``serving.frequency_cap``), for good
or, with ``cooldown_ms``, until that much event time has passed since it was last shown
(then it may come back once more per cool-down). An item the user interacted with (any
feedback: a click on an impression, a view, a rating) is never capped. The user shard
feeds it its own impressions and feedback; serving reads ``blocked`` at each request.

Invariants: counts are impressions (one per list that showed the item), never
decayed; at most ``max_users`` users (least recently shown first out) and
``max_items`` items per user (least recently shown or interacted with first out: a
forgotten item starts from zero again). Times are event time, ms. No Bytewax here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from state.settings import doc

ENGAGED = -1
"""The count of an item the user interacted with: never capped."""


@dataclass
class FrequencyCapConfig:
    """Frequency capping of unclicked repeats (state/frequency_cap.py)."""

    shows: int = doc("An item shown to a user this many times without any interaction of "
                     "the user with it is not recommended to them again (its slot goes to "
                     "the next candidate); items the user interacted with are never capped; "
                     "0: off.", 0)
    cooldown_ms: int = doc("A capped item may come back this much event time after it was "
                           "last shown (ms; 0: capped for good).", 0)
    max_items: int = doc("Items per user whose showings a shard counts (the least recently "
                         "shown forgotten first).", 100)
    max_users: int = doc("Users whose showings a shard counts (the least recently shown "
                         "forgotten first); ~190 B per item counted, max_users x max_items "
                         "of them per user shard (flows/memory.py).", 5_000)


def check_frequency_cap_config(config: FrequencyCapConfig) -> None:
    """ValueError ("key: reason") for values outside their ranges."""
    for key, value in (("shows", config.shows), ("cooldown_ms", config.cooldown_ms)):
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
    for key, value in (("max_items", config.max_items), ("max_users", config.max_users)):
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")


class FrequencyCap:
    """Per user, per item: (unclicked showings or ``ENGAGED``, last shown ts in ms)."""

    def __init__(self, config: FrequencyCapConfig) -> None:
        self.config = config
        self.users: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        """user -> item -> (showings, event time of the last one, ms); insertion order =
        least recently shown first."""

    def _items(self, user_id: str) -> dict[str, tuple[int, int]]:
        items = self.users.get(user_id)
        if items is None:
            items = self.users[user_id] = {}
            if len(self.users) > self.config.max_users:
                self.users.popitem(last=False)
        else:
            self.users.move_to_end(user_id)
        return items

    def shown(self, user_id: str, item_id: str, ts_ms: int) -> None:
        """An impression of ``item_id`` to ``user_id`` at ``ts_ms``."""
        items = self._items(user_id)
        count, last = items.pop(item_id, (0, ts_ms))
        items[item_id] = (count if count == ENGAGED else count + 1, max(last, ts_ms))
        if len(items) > self.config.max_items:
            del items[next(iter(items))]

    def engaged(self, user_id: str, item_id: str) -> None:
        """Feedback of ``user_id`` on ``item_id``: the item is never capped for them."""
        items = self._items(user_id)
        last = items.pop(item_id, (ENGAGED, 0))[1]
        items[item_id] = (ENGAGED, last)
        if len(items) > self.config.max_items:
            del items[next(iter(items))]

    def blocked(self, user_id: str, ts_ms: int) -> set[str]:
        """The items capped for ``user_id`` at ``ts_ms`` (an empty set: none)."""
        items = self.users.get(user_id)
        shows = self.config.shows
        if not items or shows <= 0:
            return set()
        cooldown = self.config.cooldown_ms
        if cooldown <= 0:
            return {item for item, (count, _) in items.items() if count >= shows}
        since = ts_ms - cooldown
        return {item for item, (count, last) in items.items() if count >= shows and last > since}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FrequencyCap) and self.config == other.config
                and self.users == other.users)
