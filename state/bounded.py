"""Bounded caches kept in plain dicts, shared by every module that keeps one: an LRU
(``lru_put``: the oldest entries dropped past a capacity) and a memo emptied when full
(``memo_put``: entries cheaper to recompute than to keep in order).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def lru_put(lru: OrderedDict[Any, Any], key: Any, value: Any, capacity: int) -> None:
    """``lru[key] = value`` as its most recent entry; the oldest entries beyond
    ``capacity`` are dropped."""
    lru[key] = value
    lru.move_to_end(key)
    while len(lru) > capacity:
        lru.popitem(last=False)


def memo_put(memo: dict[Any, Any], key: Any, value: Any, capacity: int) -> Any:
    """``memo[key] = value`` in a memo emptied when it holds ``capacity`` entries (a
    bounded cache whose entries cost less to recompute than to keep in order); returns
    ``value``."""
    if len(memo) >= capacity:
        memo.clear()
    memo[key] = value
    return value
