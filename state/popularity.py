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

    _slots: dict[str, int] | None = None
    """Once ``arrays`` was asked (the joiner's sampling pool): each id's position in
    ``_ids`` and ``_logs``, the log scores side by side in the dict's order, kept up to
    date by ``add`` (None: not kept; rebuilt by the next ``arrays``)."""
    _ids: list[str]
    _logs: np.ndarray
    """float64, ``len(_ids)`` used, with room to append."""

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
            elif self._slots is not None:
                self._append(item_id, grown)
        else:
            hi, lo = (old, grown) if old > grown else (grown, old)
            self._log_scores[item_id] = value = hi + math.log1p(math.exp(lo - hi))  # lo <= hi
            if self._slots is not None:
                self._logs[self._slots[item_id]] = value

    def _append(self, item_id: str, value: float) -> None:
        """A new id at the end of the side-by-side arrays (as in the dict)."""
        assert self._slots is not None
        n = len(self._ids)
        if n == len(self._logs):
            self._logs = np.concatenate([self._logs, np.empty(max(n, 16))])
        self._slots[item_id] = n
        self._ids.append(item_id)
        self._logs[n] = value

    def _shrink(self) -> None:
        keep = sorted(self._log_scores.items(), key=lambda kv: kv[1], reverse=True)[: self.capacity]
        self._log_scores = dict(keep)
        self._slots = None  # a new order: the arrays are rebuilt when next asked

    def scores(self, now_ms: int) -> dict[str, float]:
        """Every tracked item's count decayed to ``now_ms`` (event time)."""
        shift = now_ms * math.log(2.0) / self.half_life_ms
        return {k: exp(v - shift) for k, v in self._log_scores.items()}

    def top(self, n: int) -> list[str]:
        """The ``n`` most popular items, most popular first."""
        return [k for k, _ in sorted(self._log_scores.items(), key=lambda kv: kv[1], reverse=True)[:n]]

    def arrays(self) -> tuple[list[str], np.ndarray]:
        """(item ids, probabilities proportional to decayed popularity), in the order
        of the counts (the first id counted first). The log scores are kept side by side
        from the first call on (``add`` writes them), so a call reads no dict (the
        joiner asks once per positive, over the whole pool)."""
        if self._slots is None:
            self._ids = ids = list(self._log_scores)
            self._slots = dict(zip(ids, range(len(ids)), strict=True))
            self._logs = np.fromiter(self._log_scores.values(), float, len(ids))
        n = len(self._ids)
        if not n:
            return [], np.zeros(0)
        logs = self._logs[:n]
        p = np.exp(logs - logs.max())
        return list(self._ids), p / p.sum()

    def __len__(self) -> int:
        return len(self._log_scores)

    def __getstate__(self) -> dict[str, object]:
        """The counts only (the side-by-side arrays are rebuilt when asked)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_slots", "_ids", "_logs")}
