"""Serving glue of Thompson sampling across categories (models/category_bandit.py).

``CategoryExplore`` learns from the user shard's impressions and clicks (category from
the shard's catalog) and re-orders a scored ``CandidatePool`` into the top k, with each
slot's propensity; the generator is seeded from the request id (``stable_hash64``), so a
replay serves the same lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.category_bandit import CategoryBandit, CategoryExploreConfig
from operators.candidates import Candidate, CandidatePool
from operators.category_items import CategoryList
from operators.point_in_time import liked_recency
from state.hashing import stable_hash64


class CategoryExplore:
    """One user shard's category posteriors and the ordering that samples them."""

    def __init__(self, config: CategoryExploreConfig) -> None:
        self.bandit = CategoryBandit(config)
        self.actions = frozenset(config.actions)
        self.ordered = 0
        """Lists ordered by category sampling (metrics)."""

    def impression(self, user_id: str, item_id: str, category: str | None,
                   position: int | None, request_id: str | None,
                   attrs: dict[str, Any] | None = None, ts: int | None = None) -> None:
        """An impression (``attrs``: the user's attributes, for ``group_prior``; ``ts``: its
        event time, ms, for ``half_life_s``)."""
        self.bandit.exposure(user_id, category, position, request_id, item_id, attrs, ts)

    def feedback(self, user_id: str, item_id: str, category: str | None, action: str,
                 impression_id: str | None, organic_weight: float | None = None,
                 attrs: dict[str, Any] | None = None) -> None:
        """A feedback event: a click (``actions``) on an impression counts; so does an
        organic signal (``organic_weight``: its declared weight, None for other actions)."""
        if impression_id is not None:
            if action in self.actions:
                self.bandit.click(user_id, category, item_id, attrs)
        elif organic_weight is not None and self.bandit.config.organic:
            self.bandit.organic(user_id, category, organic_weight, attrs)

    def retrieve(self, user_id: str, n: int, lists: dict[str, CategoryList],
                 attrs: dict[str, Any] | None = None) -> tuple[list[str], np.ndarray]:
        """The ``category`` retrieval source: up to ``n`` items, the best
        ``retrieve_per_category`` of each of the user's ``n / retrieve_per_category``
        categories of highest posterior mean (among the user's own categories and the most
        clicked ones of ``lists``), each scored by that mean times its lift; none for a
        user without impressions (the scorer's sources alone, as ``order`` keeps them);
        ``attrs``: the user's attributes (``group_prior``)."""
        picks = self.pick(user_id, n, lists, attrs)
        if not picks:
            return [], np.zeros(0)
        per = self.bandit.config.retrieve_per_category
        items: list[str] = []
        for name, _ in picks:
            items.extend(lists[name].items[:per])
        return items[:n], category_scores(picks, lists, per)[:n]

    def pick(self, user_id: str, n: int, lists: dict[str, CategoryList],
             attrs: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
        """The categories ``retrieve`` takes its items from, best first, each with its
        posterior mean (a numpy float64); [] for none."""
        bandit = self.bandit
        if n <= 0 or not lists or not bandit.knows(user_id):
            return []
        per = bandit.config.retrieve_per_category
        take = max(1, n // per)
        own = [c for c in bandit.users[user_id][1] if c in lists]
        names = list(dict.fromkeys(own + list(itertools.islice(lists, take))))
        a, b = bandit.posterior(user_id, names, attrs=attrs)
        mean = a / (a + b)
        return [(names[j], mean[j]) for j in (-mean).argsort(kind="stable")[:take].tolist()]

    def order(self, request: Any, user_id: str, pool: CandidatePool,
              liked: list[str] | None = None, decay: float = 1.0,
              category: Callable[[str], str | None] | None = None,
              rates: Callable[[CandidatePool, Sequence[str]], np.ndarray] | None = None,
              attrs: dict[str, Any] | None = None) -> list[Candidate] | None:
        """``order_indices`` as the list's ``Candidate`` objects, propensities set."""
        out = self.order_indices(request, user_id, pool, liked, decay, category, rates, attrs)
        return None if out is None else pool.candidates(*out)

    def order_indices(self, request: Any, user_id: str, pool: CandidatePool,
                      liked: list[str] | None = None, decay: float = 1.0,
                      category: Callable[[str], str | None] | None = None,
                      rates: Callable[[CandidatePool, Sequence[str]], np.ndarray] | None = None,
                      attrs: dict[str, Any] | None = None
                      ) -> tuple[np.ndarray, list[float]] | None:
        """The top k of ``pool`` (scored) by category sampling as (pool positions, each
        slot's propensity), or None (keep the scorer's order) for a user without
        impressions or a pool without categories. ``liked``: the user's recent positives, newest first, weighed
        ``decay**k`` (``liked_recency``); with ``category`` (item -> its category) they
        tilt the priors (``history_prior``); ``rates(pool, names)``: the pool's item-profile
        features ``names`` (names x candidates, 0.0 without; item tables), here the
        ``item_rate`` counts that weigh the items (``item_lift``); ``attrs``: the user's
        attributes (``group_prior``)."""
        if ((pool.category is None and pool.coded is None) or not len(pool)
                or not self.bandit.knows(user_id)):
            return None  # before the history and the item counts: nothing reads them
        history = None
        if liked and category is not None and self.bandit.config.history_prior > 0:
            history = {}
            for item, weight in liked_recency(liked, decay).items():
                key = category(item) or ""
                history[key] = history.get(key, 0.0) + weight
        config = self.bandit.config
        counts = None
        if config.item_lift > 0 and rates is not None:
            clicks, shown = rates(pool, config.item_rate)
            counts = (np.minimum(clicks, shown), shown)  # clicks without impressions
        categories = pool.category if pool.coded is None else pool.coded
        out = self.bandit.order(user_id, pool.score, categories, request.k,
                                stable_hash64(f"category:{request.request_id}"), history, counts,
                                attrs)
        if out is None:
            return None
        self.ordered += 1
        return out[0], out[1].tolist()


    def user_attrs(self, profile: dict[str, Any]) -> dict[str, Any] | None:
        """``attrs_of(profile)`` when ``group_prior`` reads them, else None (the same
        posteriors: nothing else reads the attributes while serving)."""
        return attrs_of(profile) if self.bandit.config.group_prior > 0 else None


def attrs_of(profile: dict[str, Any]) -> dict[str, Any]:
    """The user's attributes from a ``UserContext.profile`` (its ``u:<key>`` entries)."""
    return {key[2:]: value for key, value in profile.items() if key.startswith("u:")}


def category_scores(picks: list[tuple[str, Any]], lists: dict[str, CategoryList],
                    per: int) -> np.ndarray:
    """The ``category`` source's scores of the picked categories' items, in order: the
    category's posterior mean times each of its best ``per`` items' lift."""
    lifts = [lists[name].lift[:per] for name, _ in picks]
    means = np.fromiter((mean for _, mean in picks), np.float64, len(picks))
    # one product over the concatenation: the same float64 products as one per category
    return np.concatenate(lifts) * means.repeat([lift.size for lift in lifts])
