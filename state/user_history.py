"""Per-user interaction history for one user shard: recent items and the consumed set.

Used by the joiner (items a user has not interacted with, for sampled negatives), by
serving (the consumed filter, co-visitation seeds) and by MF fold-in. Bounded: at
most ``max_items_per_user`` items per user (oldest forgotten first) and at most
``max_users`` users (least recently active forgotten first).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict


class UserHistory:
    """Recent distinct items per user, newest last; ``ts`` values are event time in ms."""

    def __init__(self, max_items_per_user: int = 2_000, max_users: int = 1_000_000) -> None:
        self.max_items_per_user = max_items_per_user
        self.max_users = max_users
        self._items: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.forgotten_users = 0

    def add(self, user_id: str, item_id: str, ts_ms: int) -> None:
        """Record that the user interacted with the item at ``ts_ms``."""
        items = self._items.get(user_id)
        if items is None:
            items = self._items[user_id] = {}
            if len(self._items) > self.max_users:
                self._items.popitem(last=False)
                self.forgotten_users += 1
        else:
            self._items.move_to_end(user_id)
            items.pop(item_id, None)
        items[item_id] = ts_ms
        if len(items) > self.max_items_per_user:
            del items[next(iter(items))]

    def consumed(self, user_id: str) -> dict[str, int]:
        """Items the user interacted with -> last interaction ts (ms); insertion = recency order."""
        return self._items.get(user_id, {})

    def recent(self, user_id: str, n: int) -> list[str]:
        """The user's ``n`` most recent distinct items, newest first."""
        items = self._items.get(user_id)
        if not items:
            return []
        if len(items) > 4 * n:  # a long history: the newest n keys, not a copy of all
            return list(itertools.islice(reversed(items), n))
        out = list(items)[-n:]
        out.reverse()
        return out

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UserHistory) and self._items == other._items
