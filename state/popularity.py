"""A bounded, exponentially decayed popularity count of items (event time, ms).

Counts decay with ``half_life_ms``; when more than ``capacity`` items are tracked the
least popular half of the overflow is dropped. Used for popularity-weighted negative
sampling and for popular-item retrieval.
"""

from __future__ import annotations

import math

import numpy as np

from state.decay import exp


class PopularityCounter:
    """Decayed counts per item id; scores are comparable at any common ``now``."""

    def __init__(self, capacity: int = 5_000, half_life_ms: int = 7 * 86_400_000) -> None:
        self.capacity = capacity
        self.half_life_ms = half_life_ms
        self._log_scores: dict[str, float] = {}

    def add(self, item_id: str, ts_ms: int, weight: float = 1.0) -> None:
        """Add ``weight`` at event time ``ts_ms`` (stored as log of the score grown to ts)."""
        grown = math.log(weight) + ts_ms * math.log(2.0) / self.half_life_ms
        old = self._log_scores.get(item_id)
        if old is None:
            self._log_scores[item_id] = grown
            if len(self._log_scores) > self.capacity * 1.25:
                self._shrink()
        else:
            hi, lo = (old, grown) if old > grown else (grown, old)
            self._log_scores[item_id] = hi + math.log1p(math.exp(lo - hi))  # lo <= hi

    def _shrink(self) -> None:
        keep = sorted(self._log_scores.items(), key=lambda kv: kv[1], reverse=True)[: self.capacity]
        self._log_scores = dict(keep)

    def scores(self, now_ms: int) -> dict[str, float]:
        """Every tracked item's count decayed to ``now_ms`` (event time)."""
        shift = now_ms * math.log(2.0) / self.half_life_ms
        return {k: exp(v - shift) for k, v in self._log_scores.items()}

    def top(self, n: int) -> list[str]:
        """The ``n`` most popular items, most popular first."""
        return [k for k, _ in sorted(self._log_scores.items(), key=lambda kv: kv[1], reverse=True)[:n]]

    def arrays(self) -> tuple[list[str], np.ndarray]:
        """(item ids, probabilities proportional to decayed popularity)."""
        ids = list(self._log_scores)
        if not ids:
            return ids, np.zeros(0)
        logs = np.fromiter(self._log_scores.values(), float, len(ids))
        p = np.exp(logs - logs.max())
        return ids, p / p.sum()

    def __len__(self) -> int:
        return len(self._log_scores)
