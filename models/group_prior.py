"""Category click rates of groups of users: an empirical-Bayes prior for a user's categories.

A group is the users sharing the value of a declared attribute (``user`` events'
``attrs``, e.g. ``age_bucket=25-34``; string values only). Per group and category the
shard adds up the same clicks and position-discounted exposures the users' posteriors
count (never decayed, like the shard's totals). A user's prior rate of a category is the
shard-wide rate times, per group of the user, the group's rate over the shard-wide rate,
the group's rate shrunk by ``strength`` exposures toward the shard-wide one (a group that
saw little of a category says little). So a user with few lists starts from what users
like them click, and users without attributes from the shard-wide rates as before.

No Bytewax here; ``models.category_bandit.CategoryBandit`` owns one per user shard.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np


def group_keys(attrs: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The groups of a user with attributes ``attrs``: ``"key=value"`` per string value."""
    if not attrs:
        return ()
    return tuple(sorted(f"{k}={v}" for k, v in attrs.items() if isinstance(v, str)))


class GroupPrior:
    """Per (group, category) [clicks, exposure], at most ``max_groups`` groups (least
    recently updated dropped first)."""

    def __init__(self, strength: float, max_groups: int) -> None:
        self.strength = strength
        self.max_groups = max_groups
        self.groups: OrderedDict[str, dict[str, list[float]]] = OrderedDict()
        """group -> category -> [clicks, exposure]."""

    def add(self, keys: tuple[str, ...], category: str, clicks: float, exposure: float) -> None:
        """Count ``clicks`` and ``exposure`` (discounted impressions) of ``category`` for
        every group in ``keys``."""
        for key in keys:
            counts = self.groups.get(key)
            if counts is None:
                counts = self.groups[key] = {}
                if len(self.groups) > self.max_groups:
                    self.groups.popitem(last=False)
            else:
                self.groups.move_to_end(key)
            c = counts.setdefault(category, [0.0, 0.0])
            c[0] += clicks
            c[1] += exposure

    def tilt(self, keys: tuple[str, ...], categories: list[str], rates: np.ndarray) -> np.ndarray:
        """Factor on each category's shard-wide rate (``rates``) for a user in the groups
        ``keys``: the product over the known groups of (group clicks + s rate) / (group
        exposure + s) / rate; 1 everywhere without a known group."""
        factor = np.ones(len(categories))
        s = self.strength
        if s <= 0:
            return factor
        for key in keys:
            counts = self.groups.get(key)
            if counts is None:
                continue
            for j, cat in enumerate(categories):
                gc, ge = counts.get(cat, (0.0, 0.0))
                if ge > 0:
                    factor[j] *= (gc + s * rates[j]) / (ge + s) / rates[j]
        return factor
