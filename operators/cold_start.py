"""Cold start: fill short answers from what the user shard itself knows.

Before the first item table or index snapshot exists (or when filters leave fewer than
``k`` candidates), serving has nothing or too little to rank. The user shard still knows
the catalog (broadcast ``item`` events) and its own decayed popularity of positives (the
joiner's pool), so :func:`backfill` tops the answer up to ``k``: the shard's popular
items first, then the rest of the available catalog in a per-request pseudo-random order
(exploration: every new item gets shown), never an item the request excludes, the
repeat policy blocks, or the catalog marks unavailable. Backfilled items carry source
``catalog`` and score 0.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Mapping
from typing import Any

from state.hashing import stable_hashes64
from state.popularity import PopularityCounter


def backfill(record: dict[str, Any], k: int, catalog: Mapping[str, Mapping[str, Any]],
             popularity: PopularityCounter, blocked: Container[str],
             excluded: Container[str]) -> int:
    """Append items to ``record["items"]`` until it holds ``k``; returns how many."""
    items = record["items"]
    missing = k - len(items)
    if missing <= 0 or not catalog:
        return 0
    taken = {i["item_id"] for i in items}

    def eligible(pairs: Iterable[tuple[str, Mapping[str, Any] | None]]) -> list[str]:
        """The items of (item, catalog attributes) ``pairs`` that may be added, in order."""
        return [item for item, attrs in pairs
                if attrs is not None and attrs.get("available", True) is not False
                and item not in taken and item not in blocked and item not in excluded]

    added = 0
    get = catalog.get
    # (the popular items are distinct: none of them blocks another by joining ``taken``)
    for item in eligible((i, get(i)) for i in popularity.top(4 * k))[:missing]:
        taken.add(item)
        items.append({"item_id": item, "score": 0.0, "source": "catalog", "propensity": 1.0})
        added += 1
    if added < missing:
        seed = record.get("request_id", "")
        rest = eligible(catalog.items())
        keys = stable_hashes64(rest, f"{seed}|")
        # sorted(rest, key=hash)[:n], stable: equal keys in catalog order
        for j in heapq.nsmallest(missing - added, range(len(rest)), key=keys.__getitem__):
            item = rest[j]
            items.append({"item_id": item, "score": 0.0, "source": "catalog",
                          "propensity": 1.0})
            added += 1
    return added
