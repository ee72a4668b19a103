"""Prequential baselines over an event log: popularity and co-visitation.

The prequential protocol of docs/evaluation.md, "Protocols" (Vinagre et al. 2014), the one ``streamrec eval``
applies to the flow, on the same events in the same order: at every evaluated request
(a ``request`` whose ``context.eval_item`` names the item the user consumed next) each
baseline returns the user's top ``k`` among the items seen so far, excluding every item
the user interacted with (any feedback); a hit if ``eval_item`` is in it. Then every
feedback event is learned from; nothing looks ahead.

* ``popularity``: items by number of positives so far (ties: first seen first).
* ``covisitation``: incremental item co-occurrence among each user's positives (the
  last ``window`` positives pair with a new one, weight 1, no decay), scored over the
  user's last ``window`` positives, popularity breaking ties and filling the list
  (the published anchor "incremental item co-occurrence + popularity", 0.162 on
  MovieLens 100k). The counts are a dense float32 matrix over the first
  ``max_dense_items`` items seen (grown by doubling; 4,096 items = 64 MB), so a query
  costs one numpy row sum; items beyond it count for popularity only (``truncated``
  says so, the report warns).

No Bytewax here; times are event time in ms.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

BASELINES = ("popularity", "covisitation")


class PrequentialBaselines:
    """Feed events in log order with :meth:`observe`; read ``hits`` / ``gains``."""

    def __init__(self, is_positive: Callable[[str, float], bool], k: int = 10, window: int = 20,
                 max_dense_items: int = 4096) -> None:
        self.is_positive = is_positive
        self.k = k
        self.window = window
        self.index: dict[str, int] = {}  # item -> dense index (first-seen order)
        self.ids: list[str] = []
        self.pos_count = np.zeros(1024)
        self.top = 0.0
        """The largest positive count (``pos_count.max()``: counts only grow by one)."""
        self.consumed: dict[str, dict[int, None]] = {}
        """user -> the dense indices of every item they interacted with (first time first)."""
        self.recent: dict[str, deque[int]] = {}  # user -> positives (indices), newest first
        self.max_dense = max_dense_items
        self.cooc = np.zeros((min(256, max_dense_items),) * 2, np.float32)
        self.truncated = False
        self.evaluated = 0
        self.hits = {name: 0 for name in BASELINES}
        self.gains = {name: 0.0 for name in BASELINES}

    def observe(self, event: Mapping[str, Any]) -> dict[str, int] | None:
        """Take one event; for an evaluated request return each baseline's 0-based rank of
        ``eval_item`` (-1: not in the top k), else None."""
        kind = event.get("type")
        if kind == "feedback":
            self._learn(event)
        elif kind == "request":
            item = (event.get("context") or {}).get("eval_item")
            if item is not None:
                return self._evaluate(str(event["user_id"]), str(item))
        return None

    # -- evaluation ---------------------------------------------------------------------

    def _evaluate(self, user: str, item: str) -> dict[str, int]:
        n = len(self.ids)
        pop = self.pos_count[:n]
        consumed = self.consumed.get(user, {})
        target = self.index.get(item)
        if target is None or target in consumed or not n:
            ranks = dict.fromkeys(BASELINES, -1)  # no baseline can rank it
        else:
            excluded = np.fromiter(consumed, np.intp, len(consumed))
            ranks = {"popularity": self._rank(pop, excluded, target)}
            recent = self.recent.get(user)
            if recent:
                m = min(n, self.cooc.shape[0])
                scores = np.zeros(n)
                seeds = [r for r in recent if r < m]
                scores[:m] = self.cooc[seeds, :m].sum(axis=0, dtype=np.float64)
                top = self.top
                ranks["covisitation"] = self._rank(
                    scores + (1e-9 / top if top > 0 else 0.0) * pop, excluded, target)
            else:
                ranks["covisitation"] = ranks["popularity"]
        self.evaluated += 1
        for name, rank in ranks.items():
            if rank >= 0:
                self.hits[name] += 1
                self.gains[name] += 1.0 / math.log2(rank + 2)
        return ranks

    def _rank(self, scores: np.ndarray, excluded: np.ndarray, target: int) -> int:
        """0-based rank of item ``target`` (not excluded) in the top k of ``scores``
        without the items ``excluded`` (ties: first seen first), -1 when not in it."""
        scores = scores.copy()
        scores[excluded] = -np.inf
        s = scores[target]
        # items ranked before the target: higher score, or equal score and seen earlier
        before = int(np.count_nonzero(scores > s) + np.count_nonzero(scores[:target] == s))
        return before if before < self.k else -1

    # -- learning -----------------------------------------------------------------------

    def _learn(self, event: Mapping[str, Any]) -> None:
        user, item = str(event["user_id"]), str(event["item_id"])
        i = self.index.get(item)
        if i is None:
            i = self.index[item] = len(self.ids)
            self.ids.append(item)
            if i >= self.pos_count.size:
                self.pos_count = np.concatenate([self.pos_count, np.zeros(self.pos_count.size)])
        self.consumed.setdefault(user, {})[i] = None
        value = event.get("value", 1.0)
        if self.is_positive(str(event.get("action", "")), float(value if value is not None else 1.0)):
            self.pos_count[i] += 1
            self.top = max(self.top, float(self.pos_count[i]))
            recent = self.recent.get(user)
            if recent is None:
                recent = self.recent[user] = deque(maxlen=self.window)
            if i not in recent:
                self._pair(list(recent), i)
                recent.appendleft(i)

    def _pair(self, recent: list[int], i: int) -> None:
        """Co-occurrence of item ``i`` with the user's recent positives (both ways)."""
        if i >= self.max_dense:
            self.truncated = True
            return
        size = self.cooc.shape[0]
        if i >= size:
            grown = np.zeros((min(2 * size, self.max_dense),) * 2, np.float32)
            grown[:size, :size] = self.cooc
            self.cooc = grown
        idx = [r for r in recent if r < self.max_dense]
        if idx:
            self.cooc[idx, i] += 1.0
            self.cooc[i, idx] += 1.0

    def report(self) -> dict[str, dict[str, float | int | None]]:
        """Per baseline: ``hr_at_10`` and ``ndcg_at_10`` (None before any evaluation)."""
        n = self.evaluated
        return {name: {"hr_at_10": round(self.hits[name] / n, 5) if n else None,
                       "ndcg_at_10": round(self.gains[name] / n, 5) if n else None}
                for name in BASELINES}
