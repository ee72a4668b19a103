"""Category click rates with each user counted at most once (an exposure-corrected prior).

The shard-wide rate of a category, its clicks over its exposures, is measured on the
users it was shown to, in proportion to how often: a category shown mostly to its fans
(whose many lists the sampling fills with it) looks good to everyone. Here every user
with ``e`` (discounted) exposures and ``c`` clicks of a category adds ``c / (e + m)`` to
the category's numerator and ``e / (e + m)`` to its denominator: a rate with each user
weighed ``e / (e + m)``, at most 1, so a heavy fan counts like one user and the rate is
the average of the users' own rates (``m`` -> 0) instead of the pooled one (``m`` ->
infinity). The sums follow every change of a user's counts (``change``, ``scale``,
``drop``), so reading them costs one lookup per category. No Bytewax here.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SHRINK_USERS = 1.0
"""Users' worth of the overall rate each category's rate is shrunk toward."""


class UserWeightedRates:
    """Per category, sums over users of ``(c / (e + m), e / (e + m))``."""

    def __init__(self, m: float) -> None:
        self.m = m
        self.sums: dict[str, list[float]] = {}
        """category -> [sum of c / (e + m), sum of e / (e + m)] over the users."""

    def _add(self, key: str, clicks: float, exposure: float, sign: float) -> None:
        if exposure <= 0.0:
            return
        w = sign / (exposure + self.m)
        s = self.sums.get(key)
        if s is None:
            s = self.sums[key] = [0.0, 0.0]
        s[0] += min(clicks, exposure) * w
        s[1] += exposure * w

    def change(self, key: str, counts: list[float], clicks: float, exposure: float) -> None:
        """Add (``clicks``, ``exposure``) to one user's ``counts`` of category ``key`` (the
        user's [clicks, exposure], changed in place) and move the sums with it."""
        self._add(key, counts[0], counts[1], -1.0)
        counts[0] += clicks
        counts[1] += exposure
        self._add(key, counts[0], counts[1], 1.0)

    def scale(self, counts: dict[str, list[float]], factor: float) -> None:
        """Multiply every count of one user (category -> [clicks, exposure]) by ``factor``."""
        for key, c in counts.items():
            self._add(key, c[0], c[1], -1.0)
            c[0] *= factor
            c[1] *= factor
            self._add(key, c[0], c[1], 1.0)

    def drop(self, counts: dict[str, list[float]]) -> None:
        """A user forgotten: take their counts out of the sums."""
        for key, c in counts.items():
            self._add(key, c[0], c[1], -1.0)

    def rates(self, names: Iterable[str], overall: float) -> np.ndarray:
        """Each category's rate at the level ``overall``: its users' average rate over the
        average of all categories' (``lift``) times ``overall``, the shard's pooled rate.
        Only which categories are better comes from the per-user average: it sits below
        the pooled rate (most users shown a category once never clicked it), and a lower
        prior would explore less."""
        return self.lift(names) * overall

    def lift(self, names: Iterable[str]) -> np.ndarray:
        """Each category's per-user average rate over all categories' (``SHRINK_USERS``
        users of the average added to each), 1 where nothing is known."""
        get, none = self.sums.get, (0.0, 0.0)
        both = np.array([get(n, none) for n in names], np.float64).reshape(-1, 2)
        num = np.maximum(both[:, 0], 0.0)  # sums of many signed terms: no rounding below 0
        den = np.maximum(both[:, 1], 0.0)
        total = np.maximum(np.array(list(self.sums.values()) or [[0.0, 0.0]]).sum(axis=0), 0.0)
        average = (total[0] + 1e-9) / (total[1] + 1e-9 / 0.05)  # 0.05 before any exposure
        return (num + SHRINK_USERS * average) / (den + SHRINK_USERS) / average

    @classmethod
    def of(cls, m: float, users: Iterable[dict[str, list[float]]]) -> UserWeightedRates:
        """The sums over ``users`` (each a category -> [clicks, exposure] dict): state
        pickled before the sums existed."""
        out = cls(m)
        for counts in users:
            for key, c in counts.items():
                out._add(key, c[0], c[1], 1.0)
        return out
