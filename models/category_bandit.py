"""Thompson sampling across item categories: a per-user x category click model.

Each (user, category) holds a Beta posterior of the click rate per position-discounted
exposure (an impression at 0-based position p counts ``1 / log2(2 + p)``, the DCG
discount of ``state.feature_spec`` ``position_discount``): ``Beta(a0 + clicks, b0 +
exposure - clicks)``, with a prior of ``prior_strength`` exposures at the category's
shard-wide rate (``a0 = s * rate_c``, ``b0 = s * (1 - rate_c)``; ``rate_c`` itself shrunk
to the shard's overall rate). Counts forget by the user's own lists: every new list
(request id) of a user multiplies that user's counts by ``decay``, so a taste that moved
is re-explored after a few lists whatever the event-time span. Declared organic signals
(views, plays: ``join.organic``) count as a click on one exposure, times their weight.

``order`` draws from the posteriors with a generator seeded by the request id (a replay
gives the same lists) and orders the scorer's best ``depth`` candidates: ``rerank`` (one
draw per category; key = draw / log2(2 + the item's rank in the scorer's order), so the
scorer's order holds inside a category and a category sampled higher climbs) or ``slots``
(a fresh draw per slot picks its category, filled by the scorer's best remaining item
of it). The propensity of a slot is the probability that the policy puts that item in
that slot, estimated from ``propensity_draws`` more lists drawn from the same posteriors
plus the served one (``(matches + 1) / (draws + 1)``, never 0; an estimate: Thompson
sampling has no closed form).

A user without any logged exposure keeps the scorer's order (``None`` from ``order``): a
stream without impressions (a rating log such as MovieLens) is unchanged by construction.
No Bytewax here; the serving operator calls it (operators/category_explore.py).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from models.group_prior import GroupPrior, group_keys
from models.seeded import SeededGenerator
from models.taste_change import click_surprise, cusum, exposure_surprise
from state.feature_spec import position_discount
from state.settings import doc

CATEGORY_MODES = ("rerank", "slots")


@dataclass
class CategoryExploreConfig:
    """Thompson sampling across categories (models/category_bandit.py)."""

    enabled: bool = doc("Order each list by Thompson sampling over the user's per-category "
                        "click posteriors (the scorer's order inside a category); users "
                        "without logged impressions keep the scorer's order. Default by "
                        "measurement: docs/evaluation.md.", True)
    actions: list[str] = doc("Feedback actions on an impression that count as a click.",
                             factory=lambda: ["click"])
    prior_strength: float = doc("Prior weight in position-discounted exposures (a0 + b0), at "
                                "the category's shard-wide click rate.", 10.0)
    decay: float = doc("Factor on a user's counts at each new list shown to them (1 = never "
                       "forget).", 0.9)
    half_life_s: float = doc("Forgetting by event time as well: at a user's new list their "
                             "counts also halve per this many seconds since their previous "
                             "list, so a user who comes back rarely does not keep an old taste "
                             "(``decay`` forgets per list only); 0: off. Off by measurement: "
                             "docs/evaluation.md (loop9).", 0.0)
    mode: str = doc("'rerank': one draw per category and request, each candidate keyed by "
                    "its category's draw / log2(2 + its rank in the scorer's order); 'slots': "
                    "a fresh draw per slot picks the slot's category, the scorer's best "
                    "remaining item of it fills the slot.", "rerank")
    depth: int = doc("Candidates (the scorer's best) the sampling orders.", 50)
    slots: int = doc("mode 'slots': slots per list allocated by category sampling (the "
                     "first ones; the rest in the scorer's order).", 10)
    propensity_draws: int = doc("Extra lists drawn per request for the logged propensity "
                                "estimate of each slot (0: log 1 / 1).", 16)
    item_adjusted: bool = doc("Weigh each exposure by its item's shard-wide click rate over "
                              "the shard's (expected clicks instead of impressions), so a "
                              "category is not credited with its items' popularity.", True)
    organic: bool = doc("Declared organic signals (join.organic: views, plays, ...) count "
                        "as a click on one exposure of the item's category, times the "
                        "signal's weight.", True)
    sharpen: float = doc("Draws from Beta(x a, x b), the posterior's mean with its variance "
                         "divided by about x: 1 = Thompson sampling, larger explores less. "
                         "Default by measurement (with item_lift): docs/evaluation.md.", 4.0)
    history_prior: float = doc("Tilt of each category's prior by the user's recent positives "
                               "(recency-weighted, ``serving.covis_query_decay`` per newer one): "
                               "the prior rate is the shard-wide rate times C x the category's "
                               "share of them, the share smoothed by this many positives spread "
                               "evenly over the C categories (0: off, the shard-wide rate).", 0.0)
    change_threshold: float = doc("Forgetting that follows taste changes: per user a CUSUM of "
                                  "how much better the shard-wide rates explain the user's "
                                  "newest exposures and clicks than the user's posterior "
                                  "(nats, models/taste_change.py); past this the user's counts "
                                  "are multiplied by ``change_fade``; 0: off.", 0.0)
    change_fade: float = doc("Factor on a user's counts when ``change_threshold`` detects a "
                             "moved taste.", 0.2)
    group_prior: float = doc("Empirical-Bayes prior from users like this one: each category's "
                             "prior rate times, per declared user attribute (``user`` events' "
                             "string attrs), the rate of the users sharing its value over the "
                             "shard's, that rate shrunk by this many exposures toward the "
                             "shard's (models/group_prior.py); 0: off, the shard-wide rate.",
                             0.0)
    max_groups: int = doc("Groups (attribute=value) whose category counts a shard keeps for "
                          "``group_prior``, the least recently updated dropped first; ~1.6 KB "
                          "per group (flows/memory.py).", 256)
    explore_slots: int = doc("mode 'rerank': the categories of the request's this many highest "
                             "draws each get one of the list's last this many slots when the "
                             "sampled order left them out (the scorer ranks none of their "
                             "items among its best ``depth``, or too low): filled by the "
                             "category's best candidate, so what Thompson sampling picks is "
                             "shown and learnt from; 0: off. Default by measurement: "
                             "docs/evaluation.md.", 1)
    item_lift: float = doc("Within the sampled order, weigh each candidate by its item's click "
                           "rate over its category's among the candidates (the item's rate "
                           "shrunk by this many impressions toward the category's; counts from "
                           "``item_rate``), so better items of a category come first; 0: off.",
                           20.0)
    item_rate: list[str] = doc("Item profile features (clicks, impressions) of ``item_lift``, "
                               "as the item tables publish them (the whole stream's counts).",
                               factory=lambda: ["item.clicks.1d", "item.impressions.1d"])
    retrieve_per_category: int = doc("``serving.sources.category``: items retrieved per "
                                     "category (its best by click rate over the category's, "
                                     "``item_rate`` counts shrunk by ``item_lift``), for the "
                                     "user's categories of highest posterior mean "
                                     "(operators/category_items.py). Default by "
                                     "measurement: docs/evaluation.md.", 20)
    max_categories: int = doc("``serving.sources.category``: categories (the most clicked) "
                              "whose best items serving keeps per user shard and per item "
                              "table (flows/memory.py).", 200)
    ranker_feature: bool = doc("Give the LR ranker the user's posterior of each candidate's "
                               "category as a numeric feature, ``category_posterior``: the "
                               "posterior mean a / (a + b) over the shard's overall click rate "
                               "(a lift: the scale of the LR's counts whatever the stream's "
                               "click rate; the user's counts over the shard-wide prior, no "
                               "``history_prior`` or ``group_prior`` tilt), as the posteriors "
                               "are when serving scores the pool and, in examples, as of the "
                               "impression's request; absent for a user never shown anything. "
                               "Default by measurement: docs/evaluation.md (loop14c).", True)
    max_users: int = doc("Users whose posteriors a shard keeps, and items whose click rates "
                         "it keeps (item_adjusted); the least recently updated dropped first. "
                         "The counts fade by ``decay`` per list, so recently shown users hold "
                         "what is worth keeping; ~1.2 KB per user (flows/memory.py).", 5_000)


def check_category_config(config: CategoryExploreConfig) -> None:
    """ValueError ("key: reason") for values outside their ranges."""
    if config.prior_strength <= 0:
        raise ValueError(f"prior_strength: must be > 0, got {config.prior_strength}")
    if not 0.0 < config.decay <= 1.0:
        raise ValueError(f"decay: must be in (0, 1], got {config.decay}")
    if config.half_life_s < 0:
        raise ValueError(f"half_life_s: must be >= 0, got {config.half_life_s}")
    for key, value in (("slots", config.slots), ("propensity_draws", config.propensity_draws),
                       ("explore_slots", config.explore_slots)):
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
    if config.mode not in CATEGORY_MODES:
        raise ValueError(f"mode: must be one of {CATEGORY_MODES}, got {config.mode!r}")
    if config.depth < 1:
        raise ValueError(f"depth: must be >= 1, got {config.depth}")
    if config.sharpen <= 0:
        raise ValueError(f"sharpen: must be > 0, got {config.sharpen}")
    if config.history_prior < 0:
        raise ValueError(f"history_prior: must be >= 0, got {config.history_prior}")
    if config.change_threshold < 0:
        raise ValueError(f"change_threshold: must be >= 0, got {config.change_threshold}")
    if not 0.0 <= config.change_fade <= 1.0:
        raise ValueError(f"change_fade: must be in [0, 1], got {config.change_fade}")
    if config.group_prior < 0:
        raise ValueError(f"group_prior: must be >= 0, got {config.group_prior}")
    if config.max_groups < 1:
        raise ValueError(f"max_groups: must be >= 1, got {config.max_groups}")
    if config.item_lift < 0:
        raise ValueError(f"item_lift: must be >= 0, got {config.item_lift}")
    if len(config.item_rate) != 2:
        raise ValueError(f"item_rate: must name two features (clicks, impressions), got "
                         f"{config.item_rate!r}")
    for key, value in (("retrieve_per_category", config.retrieve_per_category),
                       ("max_categories", config.max_categories)):
        if value < 1:
            raise ValueError(f"{key}: must be >= 1, got {value}")
    if config.max_users < 1:
        raise ValueError(f"max_users: must be >= 1, got {config.max_users}")


def item_lift(cat_of: np.ndarray, clicks: np.ndarray, shown: np.ndarray,
              strength: float, n_codes: int | None = None) -> np.ndarray:
    """Each candidate's click rate over its category's among the candidates (``cat_of``:
    category codes): ``(clicks + s r_c) / (shown + s) / r_c``, ``r_c`` the category's
    pooled rate shrunk by ``s`` impressions toward the candidates' overall rate."""
    return rate_lift(clicks, shown, category_rates(cat_of, clicks, shown, strength, n_codes),
                     strength)


def category_rates(cat_of: np.ndarray, clicks: np.ndarray, shown: np.ndarray,
                   strength: float, n_codes: int | None = None) -> np.ndarray:
    """Each item's category click rate (``cat_of``: category codes, all below
    ``n_codes`` when given, else their max + 1 is read): the category's pooled clicks
    over impressions, shrunk by ``strength`` impressions toward the overall rate
    ``(clicks + 1) / (impressions + 2)``."""
    n = n_codes if n_codes is not None else int(cat_of.max()) + 1 if len(cat_of) else 0
    overall = (clicks.sum() + 1.0) / (shown.sum() + 2.0)
    rate = (np.bincount(cat_of, clicks, n) + strength * overall) / (
        np.bincount(cat_of, shown, n) + strength)
    return rate[cat_of]


def rate_lift(clicks: np.ndarray, shown: np.ndarray, rate: np.ndarray,
              strength: float) -> np.ndarray:
    """Items' click rates over their categories' (``rate``: each item's category rate):
    ``(clicks + s r) / (shown + s) / r``, 1 for an item never shown."""
    return (clicks + strength * rate) / (shown + strength) / rate


class CategoryLifts(NamedTuple):
    """A user's posterior mean click rate per category key ("" for no category) over the
    shard's overall rate, at one moment (``CategoryBandit.lifts``); 1 for a category the
    shard has not seen (its prior is the overall rate)."""

    by_key: dict[str, float]

    def of(self, attrs: list[dict[str, Any] | None],
           coded: tuple[Sequence[str], np.ndarray] | None = None) -> np.ndarray:
        """The lift of each item's category (``attrs``: the items' catalog attributes,
        their ``category`` as ``state.item_table.category_of`` reads it), float64.
        ``coded``: (names, each item's string ``category`` as a position in names, -1:
        none, read from ``attrs``), ``ItemRows.value_codes``: one lookup per name."""
        get = self.by_key.get
        if coded is not None:
            names, at = coded
            out = np.array([get(name, 1.0) for name in names] + [1.0])[at]
            todo = (at < 0).nonzero()[0].tolist()  # no string value: from the attributes
        else:
            out = np.empty(len(attrs), np.float64)
            todo = range(len(attrs))
        for j in todo:
            a = attrs[j]
            value = a.get("category") if a is not None else None
            out[j] = get("" if value is None else str(value), 1.0)
        return out


class CodedCategories(NamedTuple):
    """Each candidate's category as a code (int array) into ``names`` (code -> name,
    None: no category): the serving pool's form (state/item_rows.py ``ItemRows.category``)."""

    codes: np.ndarray
    names: Sequence[str | None]


_CODE_TABLES: dict[tuple[int, bytes], tuple[Sequence[str | None], list[str], np.ndarray]] = {}
"""``category_codes``' sorted names and code table per (names list, codes present): a
``CodedCategories``' names only grow (``ItemRows.categories``: a code keeps its name),
so the same codes present give the same answer; the list is kept, so its ``id`` stays
its own (at most 256 entries, process-wide)."""


def category_codes(categories: Sequence[str | None] | CodedCategories
                   ) -> tuple[list[str], np.ndarray]:
    """(the distinct category keys sorted, each candidate's position in them); no
    category is the key "". From names, or from ``CodedCategories`` (the same lists: the
    names of the codes present are sorted, then mapped back through a code table)."""
    if isinstance(categories, CodedCategories):
        codes = categories.codes
        present = np.bincount(codes).nonzero()[0]
        key = (id(categories.names), present.tobytes())
        hit = _CODE_TABLES.get(key)
        if hit is None or hit[0] is not categories.names:
            keys = [categories.names[c] or "" for c in present.tolist()]
            names = sorted(set(keys))
            code = {c: j for j, c in enumerate(names)}
            table = np.zeros(present[-1] + 1 if present.size else 0, np.int64)
            table[present] = [code[c] for c in keys]
            if len(_CODE_TABLES) >= 256:
                _CODE_TABLES.clear()
            hit = _CODE_TABLES[key] = (categories.names, names, table)
        return list(hit[1]), hit[2][codes]
    keys = [c or "" for c in categories]
    names = sorted(set(keys))
    code = {c: j for j, c in enumerate(names)}
    return names, np.fromiter((code[c] for c in keys), np.int64, len(keys))


_DISCOUNTS: dict[int, np.ndarray] = {}
"""``log2(2 + rank)`` for ranks ``0 .. n-1``, by ``n`` (n <= ``depth``; at most 64 kept)."""
_WEIGHTS: dict[int, np.ndarray] = {}
"""``1 / log2(2 + rank)`` for ranks ``0 .. n-1``, by ``n`` (at most 64 kept)."""


def _by_length(memo: dict[int, np.ndarray], n: int,
               make: Callable[[int], np.ndarray]) -> np.ndarray:
    """``make(n)`` kept in ``memo`` (at most 64 lengths) and shared read-only."""
    out = memo.get(n)
    if out is None:
        if len(memo) >= 64:
            memo.clear()
        out = memo[n] = make(n)
        out.flags.writeable = False
    return out


def _rank_discount(n: int) -> np.ndarray:
    """``np.log2(2.0 + np.arange(n))``, made once per ``n``."""
    return _by_length(_DISCOUNTS, n, lambda m: np.log2(2.0 + np.arange(m)))


def _rank_weight(n: int) -> np.ndarray:
    """``1.0 / _rank_discount(n)``, made once per ``n``."""
    return _by_length(_WEIGHTS, n, lambda m: 1.0 / _rank_discount(m))


def best_by_row(key: np.ndarray, k: int) -> np.ndarray:
    """Each row's positions of its ``k`` largest keys, largest first, equal keys in
    position order: ``(-key).argsort(axis=1, kind="stable")[:, :k]``. An unstable sort
    gives the same first ``k`` when each row's ``k + 1`` smallest of ``-key`` are
    distinct (and not NaN); otherwise the stable sort (measured: ~3 in 2,450 zero-config
    requests, where items tie on their discount). On 17 rows of 50 keys ~12 us against
    ~15 us of the stable sort (which insertion-sorts each row)."""
    neg = -key
    order = neg.argsort(axis=1)  # equal keys in any order
    head = np.sort(neg, axis=1)[:, : k + 1]
    if (head[:, 1:] > head[:, :-1]).all():  # strictly increasing: no tie to break
        return order[:, :k]
    return neg.argsort(axis=1, kind="stable")[:, :k]


def exposure_weight(position: int | None) -> float:
    """Position-discounted exposure of one impression (1 when the position is unknown)."""
    return position_discount(position) if position is not None else 1.0


class CategoryBandit:
    """Per-user x category Beta posteriors of clicks over discounted exposure."""

    def __init__(self, config: CategoryExploreConfig) -> None:
        self.config = config
        self.users: OrderedDict[str, tuple] = OrderedDict()
        """user -> (last list id, category -> [clicks, exposure][, the change CUSUM,
        whether it saw the taste move])."""
        self.totals: dict[str, list[float]] = {}
        """category -> [clicks, exposure] over the shard (never decayed)."""
        self.items: OrderedDict[str, list[float]] = OrderedDict()
        """item -> [clicks, discounted impressions] over the shard (``item_adjusted``)."""
        self.all = [0.0, 0.0]
        """[clicks, discounted impressions] over the shard (``item_adjusted``)."""
        self.groups = GroupPrior(config.group_prior, config.max_groups)
        """Category counts of the users sharing an attribute value (``group_prior``)."""
        self.list_ts: dict[str, int] = {}
        """user -> event time (ms) of their last list's first impression (``half_life_s``)."""

    def __getstate__(self) -> dict[str, Any]:
        """Recovery state without the posterior and lift memos and the seeded generator."""
        state = self.__dict__.copy()
        state.pop("_post_memo", None)
        state.pop("_lifts_memo", None)
        state.pop("_seeded", None)
        return state

    def _changed(self) -> None:
        """Counts are about to change: the posterior and lifts memos are void."""
        self._stamp = getattr(self, "_stamp", 0) + 1  # older state: none

    def _group_prior(self) -> GroupPrior | None:
        """The group counts when ``group_prior`` is on (None in state pickled before)."""
        groups = getattr(self, "groups", None)
        return groups if groups is not None and self.config.group_prior > 0 else None

    def _time_fade(self, user_id: str, ts: int | None) -> float:
        """``half_life_s``: the factor for the event time since the user's last list (1 for
        the first, or without a time); remembers ``ts`` as the new list's."""
        half_life = self.config.half_life_s
        if half_life <= 0 or ts is None:
            return 1.0
        seen = getattr(self, "list_ts", None)
        if seen is None:  # state pickled before
            seen = self.list_ts = {}
        before = seen.get(user_id)
        seen[user_id] = ts if before is None else max(before, ts)
        if before is None or ts <= before:
            return 1.0
        return 0.5 ** ((ts - before) / 1000.0 / half_life)

    def _item_weight(self, item_id: str | None, discount: float) -> float:
        """``item_adjusted``: the item's shard-wide click rate over the shard's (shrunk by
        ``prior_strength`` impressions), so clicks on items everyone clicks weigh less."""
        if item_id is None:
            return 1.0
        counts = self.items.get(item_id)
        if counts is None:
            counts = self.items[item_id] = [0.0, 0.0]
            if len(self.items) > self.config.max_users:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(item_id)
        s = self.config.prior_strength
        overall = (self.all[0] + 1.0) / (self.all[1] + 2.0)
        rate = (counts[0] + s * overall) / (counts[1] + s)
        counts[1] += discount
        self.all[1] += discount
        return rate / overall

    def _user(self, user_id: str) -> tuple:
        entry = self.users.get(user_id)
        if entry is None:
            entry = self.users[user_id] = ("", {})
            if len(self.users) > self.config.max_users:
                gone_id, _ = self.users.popitem(last=False)
                getattr(self, "list_ts", {}).pop(gone_id, None)
        else:
            self.users.move_to_end(user_id)
        return entry

    def exposure(self, user_id: str, category: str | None, position: int | None,
                 list_id: str | None, item_id: str | None = None,
                 attrs: dict[str, Any] | None = None, ts: int | None = None) -> None:
        """An impression of an item of ``category`` at ``position`` in list ``list_id``
        (``item_id``: only read with ``item_adjusted``; ``attrs``: the user's attributes,
        for ``group_prior``; ``ts``: its event time, ms, for ``half_life_s``)."""
        self._changed()
        entry = self._user(user_id)
        last, counts = entry[0], entry[1]
        if list_id is not None and list_id != last:
            decay = self.config.decay * self._time_fade(user_id, ts)
            if decay < 1.0:
                for c in counts.values():
                    c[0] *= decay
                    c[1] *= decay
            self.users[user_id] = (list_id, counts, *entry[2:])
        w = exposure_weight(position)
        if self.config.item_adjusted:
            w *= self._item_weight(item_id, w)
        key = category or ""
        if self.config.change_threshold > 0:
            user_rate, shard_rate = self._rates(counts, key)
            self._surprise(user_id, counts, exposure_surprise(w, user_rate, shard_rate))
        counts.setdefault(key, [0.0, 0.0])[1] += w
        self.totals.setdefault(key, [0.0, 0.0])[1] += w
        groups = self._group_prior()
        if groups is not None:
            groups.add(group_keys(attrs), key, 0.0, w)

    def click(self, user_id: str, category: str | None, item_id: str | None = None,
              attrs: dict[str, Any] | None = None) -> None:
        """A click on an impression of an item of ``category`` (``attrs``: the user's)."""
        self._changed()
        key = category or ""
        if self.config.item_adjusted and item_id is not None:
            counts = self.items.get(item_id)
            if counts is not None:
                counts[0] += 1.0
            self.all[0] += 1.0
        counts = self._user(user_id)[1]
        if self.config.change_threshold > 0:
            self._surprise(user_id, counts, click_surprise(*self._rates(counts, key)))
        counts.setdefault(key, [0.0, 0.0])[0] += 1.0
        self.totals.setdefault(key, [0.0, 0.0])[0] += 1.0
        groups = self._group_prior()
        if groups is not None:
            groups.add(group_keys(attrs), key, 1.0, 0.0)

    def organic(self, user_id: str, category: str | None, weight: float,
                attrs: dict[str, Any] | None = None) -> None:
        """An organic interaction (a declared signal such as a view, no impression): the
        user sought the item out, a click on one exposure, times ``weight``."""
        self._changed()
        key = category or ""
        counts = self._user(user_id)[1]
        if self.config.change_threshold > 0:
            user_rate, shard_rate = self._rates(counts, key)
            self._surprise(user_id, counts, exposure_surprise(weight, user_rate, shard_rate)
                           + click_surprise(user_rate, shard_rate, weight))
        c = counts.setdefault(key, [0.0, 0.0])
        c[0] += weight
        c[1] += weight
        groups = self._group_prior()
        if groups is not None:
            groups.add(group_keys(attrs), key, weight, weight)

    def _rates(self, counts: dict[str, list[float]], key: str) -> tuple[float, float]:
        """(the user's posterior mean, the shard-wide rate) of category ``key``."""
        clicks = sum(c[0] for c in self.totals.values())
        exposure = sum(c[1] for c in self.totals.values())
        overall = (clicks + 1.0) / (exposure + 2.0)
        s = self.config.prior_strength
        tc, te = self.totals.get(key, (0.0, 0.0))
        shard = min(max((tc + s * overall) / (te + s), 1e-4), 1 - 1e-4)
        uc, ue = counts.get(key, (0.0, 0.0))
        return (s * shard + uc) / (s + max(ue, uc)), shard

    def _surprise(self, user_id: str, counts: dict[str, list[float]], step: float) -> None:
        """Add ``step`` to the user's change CUSUM; past ``change_threshold`` fade the
        user's counts by ``change_fade`` and mark the user as moved: their taste left what
        their attributes' groups like, so ``group_prior`` no longer tilts their prior
        (models/taste_change.py)."""
        entry = self.users[user_id]
        total, moved = cusum(entry[2] if len(entry) > 2 else 0.0, step,
                             self.config.change_threshold)
        if moved:
            fade = self.config.change_fade
            for c in counts.values():
                c[0] *= fade
                c[1] *= fade
        self.users[user_id] = (entry[0], counts, total, moved or self._moved(entry))

    @staticmethod
    def _moved(entry: tuple) -> bool:
        """Whether the change detector saw the user's taste move."""
        return len(entry) > 3 and entry[3]

    def knows(self, user_id: str) -> bool:
        """Whether the user was shown anything (else ``order`` keeps the scorer's order)."""
        entry = self.users.get(user_id)
        return entry is not None and any(c[1] > 0 for c in entry[1].values())

    def lifts(self, user_id: str) -> CategoryLifts | None:
        """The user's posterior mean click rate a / (a + b) per category the shard has seen
        over the shard's overall rate (clipped as the prior's), untilted (``posterior``
        without history or attributes): ``ranker_feature``. None for a user never shown
        anything (``knows``). A copy: later counts do not change it, so one is shared
        until the counts change (``_changed``) or another user asks: a request and its
        first impression ask for the same user with nothing counted in between."""
        stamp = getattr(self, "_stamp", 0)
        memo = getattr(self, "_lifts_memo", None)
        if memo is not None and memo[0] == stamp and memo[1] == user_id:
            return memo[2]
        out = self._lifts(user_id)
        self._lifts_memo = (stamp, user_id, out)
        return out

    def _lifts(self, user_id: str) -> CategoryLifts | None:
        if not self.knows(user_id):
            return None
        names = list(self.totals)
        if "" not in self.totals:
            names.append("")  # the key of an item without a category
        clicks, exposure = self._shard_counts()
        overall = min(max((clicks + 1.0) / (exposure + 2.0), 1e-4), 1 - 1e-4)
        entry = self.users[user_id]
        if self._tilted(entry, None, len(names)):
            a, b = self.posterior(user_id, names)
            lifts = (a / (a + b) / overall).tolist()
        else:  # the same operations on the same floats, without arrays (a + b >= s * 1e-4)
            lifts = [a / (a + b) / overall
                     for a, b in self._untilted_pairs(user_id, entry[1], names)]
        return CategoryLifts(dict(zip(names, lifts, strict=True)))

    def tilt(self, categories: list[str], history: dict[str, float] | None) -> np.ndarray:
        """Factor on each category's prior rate from the user's recent positives
        (``history``: category -> recency weight): C x the category's smoothed share of
        them (``history_prior`` positives spread evenly), 1 everywhere without any."""
        beta = self.config.history_prior
        n = len(categories)
        if not history or beta <= 0 or not n:
            return np.ones(n)
        w = np.fromiter((history.get(c, 0.0) for c in categories), np.float64, n)
        return n * (w + beta / n) / (w.sum() + beta)

    def posterior(self, user_id: str, categories: list[str],
                  history: dict[str, float] | None = None,
                  attrs: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters (a, b) of each category's click rate for the user (``history``:
        the recency weights of the user's recent positives per category, ``tilt``;
        ``attrs``: the user's attributes, ``group_prior``)."""
        entry = self.users.get(user_id, ("", {}))
        n = len(categories)
        groups = self._group_prior()
        if not self._tilted(entry, history, n):  # each category's (a, b) on its own counts
            if not n:
                return np.zeros(0), np.zeros(0)
            # two arrays from two tuples: half the instructions of one (n, 2) array's
            # conversion of n pairs (numpy discovers each pair's shape), the same floats
            a, b = zip(*self._untilted_pairs(user_id, entry[1], categories), strict=True)
            return np.array(a, np.float64), np.array(b, np.float64)
        clicks, exposure = self._shard_counts()
        overall = (clicks + 1.0) / (exposure + 2.0)
        s = self.config.prior_strength
        counts = entry[1]
        none = itertools.repeat((0.0, 0.0))
        # one array of the shard's and the user's [clicks, exposure] per category
        both = np.fromiter(itertools.chain.from_iterable(itertools.chain(
            map(self.totals.get, categories, none), map(counts.get, categories, none))),
            np.float64, 4 * n).reshape(2 * n, 2)
        num, den = both[:n, 0] + s * overall, both[:n, 1] + s
        tilt = self.tilt(categories, history)
        if groups is not None and not self._moved(entry):
            tilt = tilt * groups.tilt(group_keys(attrs), categories, num / den)
        rate = tilt * num / den
        rate = np.minimum(np.maximum(rate, 1e-4), 1 - 1e-4)  # np.clip's values
        user = both[n:]
        a = s * rate + user[:, 0]
        b = s * (1.0 - rate) + np.maximum(user[:, 1] - user[:, 0], 0.0)
        return a, b

    def _shard_counts(self) -> tuple[float, float]:
        """The shard's clicks and exposure over every category (in dict order)."""
        shard = list(self.totals.values())
        return sum([c[0] for c in shard]), sum([c[1] for c in shard])

    def _tilted(self, entry: tuple, history: dict[str, float] | None, n: int) -> bool:
        """Whether ``posterior`` tilts the user's (``entry``) priors of ``n`` categories."""
        return bool((history and self.config.history_prior > 0 and n) or (
            self._group_prior() is not None and not self._moved(entry)))

    def _untilted_pairs(self, user_id: str, counts: dict[str, list[float]],
                        categories: list[str]) -> list[tuple[float, float]]:
        """``posterior``'s (a, b) of each category without a tilt, category by category in
        Python floats (the same operations as the array form: ``a = s r + clicks``, ``b =
        s (1 - r) + max(exposure - clicks, 0)``, ``r`` the shard-wide rate clipped to
        [1e-4, 1 - 1e-4]); each category's pair kept until the counts change
        (``_changed``) or another user asks, so a request's retrieval
        (``CategoryExplore.pick``) and ordering compute it once."""
        stamp = getattr(self, "_stamp", 0)
        memo = getattr(self, "_post_memo", None)
        if memo is None or memo[0] != stamp or memo[1] != user_id:
            clicks, exposure = self._shard_counts()
            s = self.config.prior_strength
            memo = self._post_memo = (stamp, user_id, s * ((clicks + 1.0) / (exposure + 2.0)),
                                      {})
        prior, pairs = memo[2], memo[3]
        s = self.config.prior_strength
        got = list(map(pairs.get, categories))
        if None in got:  # categories not asked since the counts changed
            for j, c in enumerate(categories):
                if got[j] is None:
                    pair = pairs.get(c)  # a category listed twice: made once
                    if pair is None:
                        tc, te = self.totals.get(c, (0.0, 0.0))
                        uc, ue = counts.get(c, (0.0, 0.0))
                        rate = min(max((tc + prior) / (te + s), 1e-4), 1 - 1e-4)
                        pair = pairs[c] = (s * rate + uc,
                                           s * (1.0 - rate) + max(ue - uc, 0.0))
                    got[j] = pair
        return got  # type: ignore[return-value]

    def order(self, user_id: str, scores: np.ndarray,
              categories: Sequence[str | None] | CodedCategories, k: int,
              seed: int, history: dict[str, float] | None = None,
              counts: tuple[np.ndarray, np.ndarray] | None = None,
              attrs: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, np.ndarray] | None:
        """The top ``k`` by Thompson sampling over the categories (``mode``): (candidate
        indices of the list, each slot's propensity), or None for a user without
        exposures (keep the scorer's order). ``history``, ``attrs``: see ``posterior``;
        ``counts``: each candidate's (clicks, impressions) for ``item_lift``."""
        if not len(scores) or not self.knows(user_id):
            return None
        names, cat_of = category_codes(categories)
        depth = min(len(scores), max(self.config.depth, k))
        by_score = (-scores).argsort(kind="stable")
        best_first = by_score[:depth]
        a, b = self.posterior(user_id, names, history, attrs)
        if self.config.sharpen != 1.0:
            a, b = a * self.config.sharpen, b * self.config.sharpen
        seeded = getattr(self, "_seeded", None)  # older state: none
        if seeded is None:
            seeded = self._seeded = SeededGenerator()
        rng = seeded(seed)  # default_rng(seed)'s numbers
        draws = self.config.propensity_draws
        if self.config.mode == "rerank":  # every list at once: one row of draws per list
            theta = rng.beta(a, b, size=(draws + 1, len(names)))
            discount = _rank_discount(len(best_first))
            lift = None
            if counts is not None and self.config.item_lift > 0:
                lift = item_lift(cat_of, counts[0], counts[1], self.config.item_lift,
                                 len(names))
                discount = discount / lift[best_first]
            key = theta.take(cat_of[best_first], axis=1) / discount  # theta[:, ...]
            top = best_first.take(best_by_row(key, k))  # a strided 2-D index: take's cast
            explore = min(self.config.explore_slots, top.shape[1])
            if explore:
                top = self._explore(top, theta, by_score, cat_of, lift, explore)
            hits = (top[1:] == top[0]).sum(axis=0)
            return top[0], (hits + 1.0) / (draws + 1.0)
        draw = self._slots
        served = draw(best_first, cat_of, a, b, k, rng)
        hits = np.zeros(len(served))
        for _ in range(draws):
            other = draw(best_first, cat_of, a, b, k, rng)
            n = min(len(other), len(served))
            hits[:n] += other[:n] == served[:n]
        return served, (hits + 1.0) / (draws + 1.0)  # the served draw is one of them

    @staticmethod
    def _explore(top: np.ndarray, theta: np.ndarray, by_score: np.ndarray, cat_of: np.ndarray,
                 lift: np.ndarray | None, explore: int) -> np.ndarray:
        """``explore_slots``: in each list (a row of ``top``, candidate indices; its draws
        a row of ``theta``, one per category of the candidates; ``by_score``: every
        candidate's index in the scorer's order, a stable sort) the ``explore`` categories
        of highest draw each get a slot of the last ``explore`` when the list has none of
        their items: the category's best candidate (by ``lift`` / log2(2 + scorer rank),
        the order ``rerank`` keeps inside a category), even from below the scorer's best
        ``depth``, replaces the list's item there."""
        k = top.shape[1]
        winners = (theta.argmax(axis=1)[:, None] if explore == 1
                   else (-theta).argsort(axis=1, kind="stable")[:, :explore])
        out = top.copy()
        quality = None
        best: dict[int, int] = {}
        for slot in range(explore):
            j = winners[:, slot]
            absent = (~(cat_of[out] == j[:, None]).any(axis=1)).nonzero()[0]
            if not absent.size:
                continue
            if quality is None:  # the candidates' key inside their category
                quality = np.empty(len(by_score))  # 1 / log2(2 + rank in the scorer's order)
                quality[by_score] = _rank_weight(len(by_score))
                if lift is not None:
                    quality = quality * lift
            for r, c in zip(absent.tolist(), j[absent].tolist(), strict=True):
                if c not in best:
                    members = (cat_of == c).nonzero()[0]
                    best[c] = int(members[quality[members].argmax()])
                out[r, k - explore + slot] = best[c]
        return out

    def _slots(self, best_first: np.ndarray, cat_of: np.ndarray, a: np.ndarray,
               b: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """The first ``slots`` slots one by one: a fresh draw per slot, the best remaining
        candidate of the winning category; the rest in the scorer's order."""
        cats = cat_of[best_first]
        queues = [list(best_first[cats == j]) for j in range(len(a))]
        left = np.array([bool(q) for q in queues])
        chosen: list[int] = []
        for _ in range(min(k, self.config.slots, len(best_first))):
            j = int(np.argmax(np.where(left, rng.beta(a, b), -1.0)))
            chosen.append(int(queues[j].pop(0)))
            left[j] = bool(queues[j])
        taken = set(chosen)
        rest = [int(i) for i in best_first if int(i) not in taken][: max(k - len(chosen), 0)]
        return np.asarray(chosen + rest, np.int64)
