"""Champion/challenger choice between the two serving scorers, on live outcomes.

Every request scored by the serving ranker also has the challenger's scores (the pool
ranker's, or the retrieval blend's when the pool ranker is off), so both orderings exist
at no extra cost. Two kinds of outcome judge them, each with its own decayed counts:

* **Organic positives** (interactions without an ``impression_id``): the duel keeps each
  scorer's top k for the user's latest request; the user's next organic positive is a
  hit for every list that holds the item.
* **Clicks on interleaved lists** (team-draft interleaving, Radlinski et al. 2008): on the
  requests the duel interleaves, the served list is drawn from both top k lists in turns
  (a fair coin per round decides who picks first when both have picked equally often),
  each item labelled with the scorer (team) that picked it; a click on an impression of
  that list credits the item's team. Both teams get the same positions in expectation,
  so position bias and "a user can only click what was shown" favour neither. A click
  on a list that was not interleaved judges nothing: it would favour whichever scorer
  served (selection bias).

Hit counts decay by ``1 - 1/window`` per outcome of their kind, so the choice follows a
scorer that improves (or degrades) as it learns.

``auto`` (``mode``): a ranker serves alone only after it won. Until ``min_outcomes``
outcomes of either kind the requests are interleaved, so a new ranker never takes whole
lists before it earned them (the closed loop's dip when the first LR copy served
alone). The challenger serves alone when the organic positives favour it (MovieLens: a
pointwise ranker trained on sampled negatives orders worse than co-visitation). The
ranker serves alone when the organic positives do not favour the challenger and its
decayed click wins lead the challenger's by at least their standard deviation under a
tie (``sqrt`` of their sum; no clicks: no lead needed); otherwise the lists stay
interleaved, so a ranker that is not clearly better yet keeps earning clicks (and the
challenger gets half of every list). A
``shadow_rate`` sample of the requests stays interleaved once clicks judge.

No Bytewax here; one duel per user shard (shards choose independently).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

SCORERS = ("auto", "ranker", "retrieval", "pool")
RANKER, CHALLENGER = 1, 2
"""Team labels of an interleaved list (indices into ``ScorerDuel.decayed``)."""


def team_draft(ranker_top: Sequence[Hashable], other_top: Sequence[Hashable], k: int,
               seed: int, generator: Callable[[int], np.random.Generator] = np.random.default_rng
               ) -> tuple[list[Hashable], list[int]]:
    """Team-draft interleaving of two best-first lists into at most ``k`` items: the team
    with fewer picks (a coin flip of ``seed``'s generator on a tie) adds its best item
    not yet taken. Returns (items, team of each: ``RANKER`` or ``CHALLENGER``).
    ``generator``: makes ``default_rng(seed)``'s generator (serving's
    ``models.seeded.SeededGenerator``, cheaper)."""
    rng = generator(seed)
    lists = {RANKER: list(ranker_top), CHALLENGER: list(other_top)}
    at = {RANKER: 0, CHALLENGER: 0}
    picks = {RANKER: 0, CHALLENGER: 0}
    taken: set[Hashable] = set()
    out: list[Hashable] = []
    teams: list[int] = []
    while len(out) < k:
        if picks[RANKER] != picks[CHALLENGER]:
            order = (RANKER, CHALLENGER) if picks[RANKER] < picks[CHALLENGER] else (CHALLENGER, RANKER)
        else:
            order = (RANKER, CHALLENGER) if rng.random() < 0.5 else (CHALLENGER, RANKER)
        for team in order:
            items = lists[team]
            while at[team] < len(items) and items[at[team]] in taken:
                at[team] += 1
            if at[team] < len(items):
                item = items[at[team]]
                taken.add(item)
                out.append(item)
                teams.append(team)
                picks[team] += 1
                break
        else:
            break  # both lists exhausted
    return out, teams


@dataclass
class ScorerDuel:
    """Hit counts of the ranker's and the challenger's lists on organic positives and on
    clicks of interleaved lists."""

    window: int = 5_000
    min_outcomes: int = 30
    max_users: int = 100_000
    outcomes: int = 0
    """Organic positives matched to a recorded request."""
    hits_ranker: int = 0
    hits_retrieval: int = 0
    clicks: int = 0
    """Clicks on interleaved lists (the other kind of outcome)."""
    click_wins_ranker: int = 0
    click_wins_challenger: int = 0
    decayed: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Organic positives: [outcomes, ranker hits, challenger hits], each decayed by
    1 - 1/window per organic outcome."""
    decayed_clicks: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """The same for clicks on interleaved lists."""
    pending: OrderedDict[str, tuple[Collection[str], Collection[str]]] = field(
        default_factory=OrderedDict)
    """User -> (ranker top k, challenger top k) of the user's latest scored request, read
    by membership only: tuples of item ids, which a collection untracks (kept for up to
    ``max_users`` users; a frozenset stays tracked). Recovery state of earlier versions
    holds frozensets: read alike."""
    teams: OrderedDict[str, dict[str, int]] = field(default_factory=OrderedDict)
    """User -> item -> team of the user's latest interleaved list (items not clicked yet)."""

    def __setstate__(self, state: dict) -> None:
        """Recovery state of a version without interleaving: no clicks, no teams."""
        state.setdefault("clicks", 0)
        state.setdefault("click_wins_ranker", 0)
        state.setdefault("click_wins_challenger", 0)
        state.setdefault("teams", OrderedDict())
        state.setdefault("decayed_clicks", [0.0, 0.0, 0.0])
        self.__dict__.update(state)

    def record(self, user_id: str, ranker_top: list[str], retrieval_top: list[str]) -> None:
        """Remember both top lists of the user's request (replaces an older one)."""
        self.pending.pop(user_id, None)
        self.pending[user_id] = (tuple(ranker_top), tuple(retrieval_top))
        if len(self.pending) > self.max_users:
            self.pending.popitem(last=False)

    def record_teams(self, user_id: str, items: list[str], teams: list[int]) -> None:
        """Remember the interleaved list served to the user (replaces an older one)."""
        self.teams.pop(user_id, None)
        self.teams[user_id] = dict(zip(items, teams, strict=True))
        if len(self.teams) > self.max_users:
            self.teams.popitem(last=False)

    def forget(self, user_id: str) -> None:
        """The user's latest request was not shadow-scored: drop its older lists, so the
        next outcome is not matched against a request the user no longer saw."""
        self.pending.pop(user_id, None)
        self.teams.pop(user_id, None)

    def outcome(self, user_id: str, item_id: str) -> None:
        """The user's organic positive after a recorded request (at most one counts)."""
        lists = self.pending.pop(user_id, None)
        if lists is None:
            return
        hit_r, hit_b = item_id in lists[0], item_id in lists[1]
        self.outcomes += 1
        self.hits_ranker += hit_r
        self.hits_retrieval += hit_b
        self._decay(self.decayed, hit_r, hit_b)

    def click(self, user_id: str, item_id: str) -> bool:
        """A click on an impression of the user's latest interleaved list: one outcome,
        a hit for the team that picked the item (each item counts once). True when it
        counted."""
        teams = self.teams.get(user_id)
        team = teams.pop(item_id, None) if teams else None
        if team is None:
            return False
        self.clicks += 1
        self.click_wins_ranker += team == RANKER
        self.click_wins_challenger += team == CHALLENGER
        self._decay(self.decayed_clicks, team == RANKER, team == CHALLENGER)
        return True

    def _decay(self, d: list[float], hit_r: bool, hit_b: bool) -> None:
        keep = 1.0 - 1.0 / self.window
        d[0] = d[0] * keep + 1.0
        d[1] = d[1] * keep + hit_r
        d[2] = d[2] * keep + hit_b

    @property
    def decided(self) -> bool:
        """Enough outcomes (of both kinds) for the choice to follow the evidence."""
        return self.outcomes + self.clicks >= self.min_outcomes

    def choice(self, scorer: str) -> str:
        """``retrieval`` (the challenger) when the organic positives favour it, else
        ``ranker`` (``scorer`` itself unless ``auto``)."""
        if scorer != "auto":
            return scorer
        if self.decided and self.decayed[2] > self.decayed[1]:
            return "retrieval"
        return "ranker"

    def mode(self, sampled: bool) -> str:
        """``auto`` for a request that both scorers scored: ``ranker``, ``retrieval``
        (the challenger) or ``interleave`` (see the module doc); ``sampled``: the request
        is in the shadow sample."""
        if not self.decided:
            return "interleave"
        if self.choice("auto") == "retrieval":
            return "interleave" if sampled and self.clicks else "retrieval"
        if not self.ranker_won_clicks() or (sampled and self.clicks):
            return "interleave"
        return "ranker"

    def ranker_won_clicks(self) -> bool:
        """The ranker's decayed click wins lead the challenger's by at least ``sqrt`` of
        their sum (one standard deviation of the difference under a tie); True without
        clicks."""
        d = self.decayed_clicks
        return d[1] - d[2] >= math.sqrt(d[1] + d[2])
