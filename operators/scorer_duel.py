"""Champion/challenger choice between the two serving scorers, on live outcomes.

Every request scored by the serving ranker also has the retrieval blend score of each
candidate, so both orderings exist at no extra cost. The duel keeps each one's top k
for the user's latest request; the user's next *organic* positive interaction (one
without an ``impression_id``) is the outcome: a hit for every list that holds the item.
Clicks on served impressions are not outcomes: a user can only click what was shown,
so they would favour whichever scorer served (selection bias). Hit counts decay by
``1 - 1/window`` per outcome, so the choice follows a ranker that improves (or
degrades) as it learns.

``auto``: the ranker (the champion) serves unless, after at least ``min_outcomes``
outcomes, the retrieval blend's decayed hit count is higher. On MovieLens (organic
ratings only) a pointwise ranker trained on sampled negatives orders worse than
co-visitation and the blend takes over after the first outcomes; on impression/click
streams with no organic positives the ranker keeps serving.

No Bytewax here; one duel per user shard (shards choose independently).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

SCORERS = ("auto", "ranker", "retrieval", "pool")


@dataclass
class ScorerDuel:
    """Shadow hit counts of the ranker's and the retrieval blend's top k."""

    window: int = 5_000
    min_outcomes: int = 30
    max_users: int = 100_000
    outcomes: int = 0
    hits_ranker: int = 0
    hits_retrieval: int = 0
    decayed: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """[outcomes, ranker hits, retrieval hits], each decayed by 1 - 1/window per outcome."""
    pending: OrderedDict[str, tuple[frozenset[str], frozenset[str]]] = field(
        default_factory=OrderedDict)
    """User -> (ranker top k, retrieval top k) of the user's latest scored request."""

    def record(self, user_id: str, ranker_top: list[str], retrieval_top: list[str]) -> None:
        """Remember both top lists of the user's request (replaces an older one)."""
        self.pending.pop(user_id, None)
        self.pending[user_id] = (frozenset(ranker_top), frozenset(retrieval_top))
        if len(self.pending) > self.max_users:
            self.pending.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """The user's latest request was not shadow-scored: drop its older lists, so the
        next outcome is not matched against a request the user no longer saw."""
        self.pending.pop(user_id, None)

    def outcome(self, user_id: str, item_id: str) -> None:
        """The user's organic positive after a recorded request (at most one counts)."""
        lists = self.pending.pop(user_id, None)
        if lists is None:
            return
        hit_r, hit_b = item_id in lists[0], item_id in lists[1]
        self.outcomes += 1
        self.hits_ranker += hit_r
        self.hits_retrieval += hit_b
        keep = 1.0 - 1.0 / self.window
        d = self.decayed
        d[0] = d[0] * keep + 1.0
        d[1] = d[1] * keep + hit_r
        d[2] = d[2] * keep + hit_b

    def choice(self, scorer: str) -> str:
        """``ranker`` or ``retrieval`` for a request when the ranker is available."""
        if scorer != "auto":
            return scorer
        if self.outcomes >= self.min_outcomes and self.decayed[2] > self.decayed[1]:
            return "retrieval"
        return "ranker"
