"""What a user shard knows at an event's time: the one feature source of training and serving.

``PointInTime`` is built once per user shard over the shard's own state (history,
positives, profiles, catalog, user attributes, MF user vectors) and its
``SnapshotViews`` (the item side: item tables, index, serving ranker, as of the
micro-batch's first event). The joiner takes example features from it at impression
time and serving takes candidate features from it at request time, so training and
serving features are the same function of the same state:

* ``user(user_id, ts_ms)``: the ``UserContext`` (profile as of ``ts_ms``, recent and
  liked items, consumed set, MF vector), built once per request;
* ``item_features(ctx, item_ids, ts_ms, covis)``: per-item features (item attributes,
  user x item-attribute profiles, item profile, category, co-visitation with the recent
  items, popularity, trending, MF score);
* ``example_features(user_id, item_id, ts_ms)``: both, for one impression (the
  joiner's ``JoinContext``), with ``consumed`` for its sampled negatives.

It only reads: the user shard applies every event after taking its features.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.category_bandit import CategoryLifts
from models.features import compact
from models.mf import UserFactors
from operators.example_codec import EncodedPart, encoded_part, join_parts
from operators.snapshot_views import FrozenViews, SnapshotViews
from state.bounded import memo_put
from state.covis_view import SparseScores
from state.decay import decay_factor
from state.embedding_table import keys_of
from state.item_rows import ItemRows
from state.item_table import (
    FrozenFeatures,
    ItemTable,
    catalog_category,
    row_profile,
)
from state.join_state import float32_features
from state.profiles import ProfileStore
from state.user_history import UserHistory


@dataclass
class UserContext:
    """What the user shard knows of the user at request (or impression) time."""

    user_id: str
    recent: list[str]
    consumed: dict[str, int]
    vector: np.ndarray | None
    profile: dict[str, Any]
    liked: list[str] = field(default_factory=list)
    """Recent positives, newest first (``recent`` holds every interaction)."""
    finished: dict[str, int] = field(default_factory=dict)
    """Items with a consuming action (``serving.consume_actions``) -> its last ts (ms)."""
    categories: CategoryLifts | None = None
    """The category sampling's posterior lifts for the user when the context was taken
    (``serving.category_explore.ranker_feature``; None: off, or a user never shown
    anything): the ``category_posterior`` column."""


CATEGORY_POSTERIOR = "category_posterior"
"""The category sampling's column (``UserContext.categories``)."""

NUMERIC_ITEM_FEATURES = ("pop", "trend", "covis", "covis_any", "mf", "ui.interacted", "ui.liked",
                         CATEGORY_POSTERIOR)
"""Numeric per-candidate features: from the snapshots, popularity and trending (decayed
to the event's time), co-visitation sums of the liked and any-interaction channels, MF
score; from the user shard, whether the user already interacted with the item (1.0 /
0.0), how recent their positive on it is (``liked_recency``: ``decay**k`` for the k-th
newest positive, 0.0 for none) and the category sampling's posterior mean click rate of
the item's category for the user over the shard's overall rate
(``serving.category_explore.ranker_feature``). Absent means 0.0 (no table, no seeds, no
vector, no interaction with any of the items, a user the category sampling never showed
anything)."""


@dataclass
class ItemColumns:
    """Candidate features column-wise: the same values as ``PointInTime.item_features``."""

    item_ids: list[str]
    numeric: dict[str, np.ndarray]
    """``NUMERIC_ITEM_FEATURES`` present for this request, raw values (float64, 0.0 where
    absent), in that order."""
    tables: list[ItemTable | None]
    """The item table holding each item (None: not published yet)."""
    attrs: list[dict[str, Any] | None]
    """The shard catalog's attributes of each item (a new object when they change)."""
    cross: list[list[dict[str, Any]]] | None
    """The user x item-attribute profile features of each item (one dict per value);
    None when given as ``cross_codes`` (``cross_lists`` builds it)."""
    rows: np.ndarray | None = None
    """The items' rows in serving's ``ItemRows`` id space (the array path), else None."""
    space: ItemRows | None = None
    """The ``ItemRows`` of ``rows``."""
    slots: np.ndarray | None = None
    """The items' slots in ``space`` (its per-item values)."""
    cross_codes: list[tuple[np.ndarray, list[dict[str, Any]]]] | None = None
    """Per ``user_x_<attr>`` profile: each item's value code (-1: none) and the features
    of each code: ``cross`` column-wise. Read it through ``codes()``: on the array path
    it is queried on first use (a scorer that reads only ``numeric``, the pool ranker,
    queries no profile)."""
    cross_query: Callable[[], list[tuple[np.ndarray, list[dict[str, Any]]]]] | None = None
    """What ``codes()`` calls once to fill ``cross_codes`` (None: filled already)."""

    def codes(self) -> list[tuple[np.ndarray, list[dict[str, Any]]]] | None:
        """``cross_codes``, queried now if it was left for later."""
        if self.cross_query is not None:
            self.cross_codes, self.cross_query = self.cross_query(), None
        return self.cross_codes

    def cross_lists(self) -> list[list[dict[str, Any]]]:
        """``cross``, built from ``cross_codes`` when needed."""
        if self.cross is None:
            n = len(self.item_ids)
            cross: list[list[dict[str, Any]]] = [[] for _ in range(n)]
            for codes, feats in self.codes() or ():
                for j, c in enumerate(codes.tolist()):
                    if c >= 0:
                        cross[j].append(feats[c])
            self.cross = cross
        return self.cross


def liked_recency(liked: list[str], decay: float) -> dict[str, float]:
    """``ui.liked`` of the user's recent positives (newest first): ``decay**k`` for the
    k-th newest (k = 0 newest), so a positive fades as the user makes new ones, whatever
    the event-time scale; items beyond ``liked`` (the 50 newest) are 0. Forgetting by
    count, like the co-visitation seeds (``serving.covis_query_decay``): after a change
    of taste, the few newest positives outweigh the old ones (docs/evaluation.md)."""
    out: dict[str, float] = {}
    weight = 1.0
    for item in liked:
        out.setdefault(item, weight)
        weight *= decay
    return out


TableCapture = tuple[Any, ...] | None
"""What an item's static features read of its item table: (its item profile, its
category), or a raw profile with the category appended (``RawProfile``'s names, its
values, then the category: one flat tuple), or None when no table holds the item
(``table_capture``). The profile (or the names) first, the category last."""


def table_capture(item_id: str, table: ItemTable | None, raw: bool = False) -> TableCapture:
    """The item's item profile and category in ``table`` (None without a table): small
    objects that outlive the table version without keeping it alive. ``raw``: a loaded
    table's profile as its row (``FrozenFeatures.raw``), made a dict only when read
    (``static_features_of``; a detached version's items are mostly never read), in one
    flat tuple with the category: a capture the collector untracks at its first
    collection (a nested one a collection later per level)."""
    if table is None:
        return None
    features = table.features
    profile = (features.raw(item_id) if raw and type(features) is FrozenFeatures
               else features.get(item_id))
    category = catalog_category(table.catalog, item_id)
    return (*profile, category) if type(profile) is tuple else (profile, category)


def shared_capture(item_id: str, table: ItemTable) -> TableCapture:
    """``table_capture(item_id, table, raw=True)``, made once per table version for every
    user shard of the process (``table.memo``, dropped with the table): the shards detach
    from the same loaded versions, and about half of their captured items are another
    shard's too (zc60k, first 20k events: 5,766 distinct of 10,814). Shared, never
    modified."""
    captures = table.memo.get(_CAPTURES)
    if captures is None:
        captures = table.memo[_CAPTURES] = {}
    found = captures.get(item_id)
    if found is None:
        found = captures[item_id] = table_capture(item_id, table, raw=True)
    return found


_CAPTURES = "point_in_time.table_capture"
"""``shared_capture``'s key in an item table's ``memo``."""


CountRow = tuple["ItemTable | _CapturedTable", float, float] | None
"""An item's table and its raw ``popular`` and ``trending`` counts there (0.0 when
absent), as of the table's ``ts``; None when no table holds the item
(``PointInTime._count_rows``)."""


def _decayed_counts(rows: list[CountRow], at: int) -> tuple[list[float], list[float]]:
    """Popularity and trending of each item (its ``CountRow``) decayed to ``at`` (ms):
    ``count * table.decay_factor(...)``, one factor pair per table; 0.0 without a table."""
    factors: dict[str, tuple[float, float]] = {}
    pop: list[float] = []
    trend: list[float] = []
    for row in rows:
        if row is None:
            pop.append(0.0)
            trend.append(0.0)
            continue
        table, popular, trending = row
        fp, ft = factors.get(table.shard) or factors.setdefault(
            table.shard, (table.decay_factor("popular", at), table.decay_factor("trending", at)))
        pop.append(popular * fp)
        trend.append(trending * ft)
    return pop, trend


def user_item_columns(ctx: UserContext, item_ids: list[str], decay: float
                      ) -> dict[str, np.ndarray] | None:
    """The user's own history with each item (do repeats pay off?): ``ui.interacted``
    (1.0 / 0.0) and ``ui.liked`` (``liked_recency``), float64; None when the user
    interacted with none of the items (``ctx.consumed``)."""
    consumed = ctx.consumed
    if not consumed:
        return None
    seen = member_mask(consumed, item_ids)
    if not seen.any():
        return None
    recency = liked_recency(ctx.liked, decay)
    liked = np.zeros(len(item_ids))  # 0.0 where not liked: the few liked ones set
    at = member_mask(recency, item_ids).nonzero()[0]
    if at.size:
        liked[at] = [recency[item_ids[j]] for j in at.tolist()]
    return {"ui.interacted": seen.astype(np.float64), "ui.liked": liked}


def member_mask(container: Container[Any], items: list[str]) -> np.ndarray:
    """Whether each of ``items`` is in ``container``, a read-only bool array: the lookups'
    bools as bytes (made in C) read in place; ``np.fromiter`` would pack each Python
    value on its own, ~3x the instructions of the lookups."""
    return np.frombuffer(bytes(map(container.__contains__, items)), np.bool_)


def static_item_features(item_id: str, table: ItemTable | None,
                         attrs: dict[str, Any] | None) -> dict[str, Any]:
    """The item's features that change only with its table version or its attributes:
    item profile (IPS ``item`` entity, as of the table), ``i:category`` (the table's
    catalog), then ``i:<attr>`` of the shard's catalog (``item`` events; they win)."""
    return static_features_of(table_capture(item_id, table), attrs)


def static_features_of(capture: TableCapture, attrs: dict[str, Any] | None) -> dict[str, Any]:
    """``static_item_features`` from the item's ``table_capture``."""
    extra: dict[str, Any] = {}
    if capture is not None:
        profile = capture[0]
        if type(profile) is tuple:  # a raw profile's names: its values follow
            profile = row_profile(profile, capture[1:-1])
        if profile:
            extra.update(profile)
        extra["i:category"] = capture[-1]
    if attrs:
        for key, value in attrs.items():
            if key != "available" and not isinstance(value, dict):
                extra[f"i:{key}"] = value
    return extra


MAX_STATIC_MEMO = 2_048
"""Entries of a user shard's memo of static item features (``PointInTime._static_part``;
cleared when full): the items a shard joins most, within the memory bound
(flows/memory.py ``static_memo_item``). 65,536 added ~33 MB to the churn test's peak
(tests/reliability/test_bounded_memory.py), past its bound."""

MAX_VECTOR_MEMO = 2_048
"""Entries of a user shard's memo of MF user vectors (``PointInTime._user_vector``; emptied
at every MF step and when full): the users of a micro-batch."""

_SHARED_STATICS: dict[tuple[str, tuple[Any, ...]],
                      tuple[dict[str, Any], dict[str, Any], EncodedPart | None]] = {}
"""``_static_part``'s results without a table, shared by the user shards of a process,
keyed by the item and its attributes' contents (``_attrs_key``): every shard keeps its
own copy of an item's attributes (an ``item`` event reaches them all), so without it
each shard computed the same static features again (~4 us an item: 7 of 8 shards' first
reads). Its values are also in the shards' memos (shared, never modified); at most
``MAX_STATIC_MEMO`` entries (cleared when full), not part of any recovery state."""

_SHARED_BY_ATTRS: dict[int, tuple[dict[str, Any], str, tuple[
    dict[str, Any], dict[str, Any], EncodedPart | None]]] = {}
"""``_static_part``'s results without a table by the attributes object's identity (held
with them, so its id is not reused while here) and the item: the shards of a process
share each ``item`` event's catalog entry (``operators.user_shard.catalog_attrs``), so a
shard's first read of an item another shard read takes its results without building
``_attrs_key`` (the same object: the same values). At most ``MAX_STATIC_MEMO`` entries
(cleared when full), not part of any recovery state."""

_STATIC_NAMES: dict[tuple[str, ...], tuple[str, ...]] = {}
"""One object per distinct names of the static parts whose static features kept every
name (none compacted away: their names are those of the static features themselves), so
``_resolve_plain`` tells a part of names it checked by identity. At most
``MAX_STATIC_MEMO`` entries (cleared when full); not part of any recovery state."""


def _static_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` as ``_STATIC_NAMES``' object (the names of a static part, every static
    feature's name)."""
    held = _STATIC_NAMES.get(names)
    if held is None:
        held = memo_put(_STATIC_NAMES, names, names, MAX_STATIC_MEMO)
    return held


_KEY_SCALARS = frozenset((str, int, float, bool, type(None)))


def _attrs_key(attrs: dict[str, Any]) -> tuple[Any, ...] | None:
    """``attrs`` as a key of ``_SHARED_STATICS``: its (name, type, value) in order when
    every value is a str, int, bool, None or a non-zero float, None otherwise. Equal keys
    give ``static_features_of`` the same names and values bit for bit (equal values of
    one such type are the same string or number; ``-0.0 == 0.0`` and dicts or lists are
    left out)."""
    key = []
    for name, value in attrs.items():
        kind = type(value)
        if kind not in _KEY_SCALARS or (kind is float and value == 0.0):
            return None
        key.append((name, kind, value))
    return tuple(key)

RETAINED_VERSIONS = 0
"""Replaced snapshot versions (item tables + index) a user shard may keep for the deferred
features of pending impressions whose negative the sampler drops (needed only if
clicked). Beyond it, the features reading the oldest are computed and the version is
let go: at most this many old versions stay in memory per shard (they share their
unchanged tables with the current one). 0 (every pending impression computed when the
snapshots move): keeping 8 saved ~6% of the zero-config flow's CPU outside serving but
adds 8 full-capacity tables (5,460 MB) to the default memory bound (flows/memory.py),
past the half of the machine the defaults hold (docs/evaluation.md, flowcost)."""


@dataclass(frozen=True)
class CovisQuery:
    """How recent items seed co-visitation (serving.recent_items, covis_query_decay)."""

    recent_items: int = 40
    decay: float = 0.8


class PointInTime:
    """Features known strictly before an event, from the user shard's state and snapshots."""

    def __init__(self, *, history: UserHistory | None = None, liked: UserHistory | None = None,
                 profiles: dict[str, ProfileStore] | None = None,
                 catalog: OrderedDict[str, dict[str, Any]] | None = None,
                 user_attrs: OrderedDict[str, dict[str, Any]] | None = None,
                 users: UserFactors | None = None, views: SnapshotViews | None = None,
                 item_shard_of: Callable[[str], str] | None = None,
                 covis: CovisQuery | None = None,
                 finished: UserHistory | None = None) -> None:
        """The user shard passes its own state (read, never written here); what is not
        given is empty (e.g. a context over snapshots only, for serving tests)."""
        self.history = history if history is not None else UserHistory()
        self.liked = liked
        self.finished = finished
        """Each user's items with a consuming action (the repeat policy); None = none."""
        """Each user's positives; None when co-visitation is off."""
        profiles = profiles if profiles is not None else {}
        self.profiles = profiles
        self.catalog = catalog if catalog is not None else OrderedDict()
        """Item attributes (+ ``available``), from broadcast ``item`` events."""
        self.user_attrs = user_attrs if user_attrs is not None else OrderedDict()
        self.users = users
        self.views = views
        self.item_shard_of = item_shard_of
        self.covis = covis or CovisQuery()
        self._crosses = [(kind[7:], store) for kind, store in profiles.items()
                         if kind.startswith("user_x_")]
        self.group: object = None
        """What the event being joined shares its user context with (set by the user
        shard): its request id (the impressions of one request), the feedback event
        itself (an interaction and its sampled negatives), or None (nothing)."""
        self._shared: _Shared | None = None
        self._frozen: FrozenViews | None = None
        self._retained: deque[weakref.ref[FrozenViews]] = deque()
        """Replaced snapshot versions that deferred features may still read, oldest first."""
        self._taken: _Taken | None = None
        """The group the last deferred features were taken in (``deferred_features``)."""
        self._open: list[weakref.ref[_Taken]] = []
        """The groups taken on snapshot versions not let go yet (``release_frozen``)."""
        self._open_limit = 1_024
        self._statics: dict[str, tuple[Any, Any, dict[str, Any], dict[str, Any]]] = {}
        """``_static_part`` memo: item -> (table weakref, attributes object, static
        features, the same at example precision), for the newest table and attributes
        asked."""
        self._fold_memo: tuple[str, Any, list[str], np.ndarray] | None = None
        """``_folded_vector`` memo: (user, index version, seeds, vector) of the last call."""
        self._vectors: dict[str, np.ndarray | None] | None = None
        """``_user_vector`` memo: user -> MF vector (read-only) or None, since the owner last
        announced a change of the user vectors (``vectors_changed``); None: not announced."""
        self._frozen_trust = False
        """Whether the owner announces its polls (``polled``)."""
        self._frozen_fresh = False
        """``_frozen`` was checked current since the last poll (``polled``)."""
        self.category_lifts: Callable[[str], CategoryLifts | None] | None = None
        """The category sampling's per-user posterior lifts (``CategoryBandit.lifts``), set
        by the user shard when ``ranker_feature`` is on: taken into every ``UserContext``."""

    def __getstate__(self) -> dict[str, Any]:
        """Recovery state without the frozen snapshot views (reloaded from the store)."""
        state = self.__dict__.copy()
        state["_frozen"] = None
        state["_retained"] = deque()
        state["_statics"] = {}
        state["_fold_memo"] = None
        state["_vectors"] = None
        state["_taken"] = None
        state["_open"] = []
        state["_frozen_fresh"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_retained", deque())  # state of older versions
        self.__dict__.setdefault("_statics", {})
        self.__dict__.setdefault("_fold_memo", None)
        self.__dict__.setdefault("_vectors", None)
        self.__dict__.setdefault("_taken", None)
        self.__dict__.setdefault("_open", [])
        self.__dict__.setdefault("_open_limit", 1_024)
        self.__dict__.setdefault("_frozen_trust", False)
        self.__dict__.setdefault("_frozen_fresh", False)
        self.__dict__.setdefault("category_lifts", None)

    def forget(self, user_id: str) -> None:
        """The user's state is about to change: contexts taken before it are stale."""
        if self._shared is not None and self._shared.user_id == user_id:
            self._shared = None

    # -- the user ------------------------------------------------------------------
    def user(self, user_id: str, ts_ms: int | None) -> UserContext:
        """The user's state for features: profile as of ``ts_ms`` (events before it)."""
        profile: dict[str, Any] = {}
        store = self.profiles.get("user")
        if store is not None:
            profile = store.query_key(store.plan.key(user_id), _query_time(store, ts_ms))
            for name in _query_plan(store).ts_names:  # a fresh dict: its times made ages
                profile[name] = _feature_value(name, profile[name], ts_ms)
        for key, value in self.user_attrs.get(user_id, {}).items():
            profile[f"u:{key}"] = value
        vector = self._user_vector(user_id) if self.users is not None else None
        recent = self.history.recent(user_id, 50)
        if vector is None and self.users is not None and recent:
            vector = self._folded_vector(user_id, recent[:20])
        liked = self.liked.recent(user_id, 50) if self.liked is not None else []
        finished = self.finished.consumed(user_id) if self.finished is not None else {}
        lifts = self.category_lifts(user_id) if self.category_lifts is not None else None
        return UserContext(user_id, recent, self.history.consumed(user_id), vector, profile, liked,
                           finished, lifts)



    def vectors_changed(self) -> None:
        """The owner is about to change the user vectors (MF steps, fold-ins: the only
        writes of ``users``; an insert may evict another user's row): the vectors read
        since are stale. An owner that never calls it gets a fresh read at every ``user``."""
        self._vectors = {}

    def _user_vector(self, user_id: str) -> np.ndarray | None:
        """``users.vector(user_id)``, read once per user while the user vectors stay as
        they are (``vectors_changed``): a request and its impressions' context (and the
        user's other requests of the micro-batch) share one read-only array."""
        assert self.users is not None
        vectors = self._vectors
        if vectors is None:
            return self.users.vector(user_id)
        if user_id in vectors:
            return vectors[user_id]
        vector = self.users.vector(user_id)
        if vector is not None:
            vector.setflags(write=False)
        memo_put(vectors, user_id, vector, MAX_VECTOR_MEMO)
        return vector

    def _folded_vector(self, user_id: str, seeds: list[str]) -> np.ndarray:
        """A user without an MF row: the mean of its recent items' vectors (read-only),
        memoised for the last user while its seeds and the index version stay the same
        (a request and the rating after it ask twice; the same inputs give the same bits)."""
        index = self.views.index.index if self.views is not None else None
        memo = self._fold_memo
        if memo is not None and memo[0] == user_id and memo[1] is index and memo[2] == seeds:
            return memo[3]
        vector = self.item_vectors(seeds).mean(axis=0)
        vector.setflags(write=False)
        self._fold_memo = (user_id, index, seeds, vector)
        return vector

    def consumed(self, user_id: str) -> Container[str]:
        """Items the user interacted with (the joiner's sampled negatives avoid them)."""
        return self.history.consumed(user_id)

    # -- features ------------------------------------------------------------------
    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict[str, Any]:
        """The joiner's features of one (user, item) at ``ts_ms`` (point in time), without
        the values that add nothing to the model (``models.features.compact``).

        The user's context is taken once per ``group`` (the impressions of one request;
        an interaction and its sampled negatives), as of the group's first event: its
        siblings do not count as earlier impressions."""
        shared = self._shared_context(user_id, ts_ms)
        attrs = self.catalog.get(item_id)
        cross = self._cross(shared.user_id, shared.crosses, attrs, ts_ms)
        extra = self.item_features(shared.ctx, [item_id], ts_ms, attrs=[attrs], cross=[cross])[0]
        return compact({**shared.ctx.profile, **extra})

    def deferred_features(self, user_id: str, item_id: str, ts_ms: int) -> Deferred:
        """``example_features`` computed later, only if needed (the joiner asks for
        impressions whose negative the sampler will drop: they need features only if
        clicked). What they read is kept now in a ``Deferred`` token (the user context,
        the item's attributes, its user x attribute profile values, the snapshots
        served), all immutable once taken, so ``resolve_all`` gives exactly what
        ``example_features`` gives now."""
        shared, group = self._shared, self.group
        if (shared is None or group is None or shared.group != group or shared.ts != ts_ms
                or shared.user_id != user_id):
            shared = self._shared_context(user_id, ts_ms)
        views = self._frozen
        if views is None or not self._frozen_fresh:  # (else: _frozen_views' answer, inline)
            views = self._frozen_views()
        taken = self._taken
        if taken is None or taken.ctx is not shared.ctx or taken.views is not views:
            taken = self._taken = _Taken(shared.ctx, ts_ms, views)
            if views is not None:
                self._track(taken)
        taken.items.append(item_id)
        attrs = self.catalog.get(item_id)
        return (taken, item_id, attrs,
                self._cross(shared.user_id, shared.crosses, attrs, ts_ms)
                if self._crosses and attrs else _NO_CROSS,
                item_id in taken.ctx.consumed)

    def _track(self, taken: _Taken) -> None:
        """Remember a group taken on the current snapshots (weakly) for ``release_frozen``;
        the groups already gone are dropped whenever the list doubled since (so it stays
        within twice the live groups while the snapshots do not move)."""
        opened = self._open
        opened.append(weakref.ref(taken))
        if len(opened) > self._open_limit:
            opened[:] = [ref for ref in opened if ref() is not None]
            self._open_limit = max(1_024, 2 * len(opened))

    def deferred_run(self, user_id: str, item_ids: list[str], ts_ms: int) -> list[Deferred]:
        """``deferred_features`` of each of ``item_ids`` (a request's impressions, one
        ``group``, in order): the group's context and capture are looked up once, each item
        adds only its attributes, cross profile values and seen flag. The same tokens as
        one call per item."""
        first = self.deferred_features(user_id, item_ids[0], ts_ms)
        taken = first[0]
        taken.items += itertools.islice(item_ids, 1, None)
        consumed = taken.ctx.consumed
        get = self.catalog.get
        if self._crosses:
            shared = self._shared_context(user_id, ts_ms)  # the one deferred_features used
            cross_of, crosses = self._cross, shared.crosses
            out = [first]
            for item in itertools.islice(item_ids, 1, None):
                attrs = get(item)
                out.append((taken, item, attrs,
                            cross_of(user_id, crosses, attrs, ts_ms) if attrs else _NO_CROSS,
                            item in consumed))
            return out
        out = [(taken, item, get(item), _NO_CROSS, item in consumed)
               for item in itertools.islice(item_ids, 1, None)]
        out.insert(0, first)
        return out

    def features_run(self, user_id: str, item_ids: list[str], ts_ms: int, wire: bool = False
                     ) -> list[Any]:
        """``resolve_all(deferred_run(user_id, item_ids, ts_ms), wire)``: the features of a
        request's impressions, or of an organic interaction's item and its sampled
        negatives (``Joiner._features_of``), computed at once; without a token per item when there are no
        snapshots and no cross profiles (``_resolve_plain`` on the items column-wise)."""
        if self.views is not None or self._crosses:
            return self.resolve_all(self.deferred_run(user_id, item_ids, ts_ms), wire)
        ctx = self._shared_context(user_id, ts_ms).ctx  # the group's (deferred_features')
        consumed = ctx.consumed
        out: list[Any] = [None] * len(item_ids)
        self._resolve_plain(ctx, item_ids, list(map(self.catalog.get, item_ids)),
                            list(map(consumed.__contains__, item_ids)), range(len(item_ids)),
                            out, wire)
        return out

    def resolve_all(self, deferred: list[Deferred], wire: bool = False) -> list[Any]:
        """The features of each ``Deferred`` token, in order: what ``example_features``
        gave when it was taken, at example precision (``float32_features``); an entry that
        is not a token (features computed already) comes back as it is. One
        ``item_features`` call per group taken together (same user context, time and
        snapshots: the impressions of one request), so the co-visitation seeds are read
        once per group instead of once per impression. MF scores are products one row at
        a time, as ``example_features`` computes them (a matrix product over many items
        may differ in the last bit).

        ``wire``: features that are the profile, each item's static features and its
        numeric columns, each encodable as a part, come as their wire value instead (a
        list, ``operators.example_codec.join_parts``: the profile encoded once per group,
        each item's static part once per memo entry; no merged dict); the rest as dicts."""
        out: list[Any] = [None] * len(deferred)
        groups: dict[tuple[int, int, int], list[int]] = {}
        last: _Taken | None = None  # a request's tokens come in a row: grouped by identity
        members: list[int] = []
        for j, d in enumerate(deferred):
            if type(d) is not tuple:  # computed already (a dict): as it is
                out[j] = d
                continue
            taken = d[0]
            if taken is last:
                members.append(j)
                continue
            last = taken
            members = groups.get(taken.key)  # type: ignore[assignment]
            if members is None:
                members = groups[taken.key] = [j]
            else:
                members.append(j)
        for members in groups.values():
            group = [deferred[j] for j in members]
            first = group[0][0]
            if self.views is None and not any([d[3] for d in group]):
                self._resolve_plain(first.ctx, [d[1] for d in group], [d[2] for d in group],
                                    [d[4] for d in group], members, out, wire)
                continue
            ctx = as_taken(first.ctx, group)
            items = [d[1] for d in group]
            cross: list[list[dict[str, Any]]] = [d[3] for d in group]
            detached = first.detached
            if detached is not None:  # its version was let go: what it read was captured
                version = detached.version
                numeric = ([] if version.tables is None else self._snapshot_columns(
                    ctx, items, first.ts, version.any_channel, version.tables,
                    version.count_rows(items)))
                numeric += detached.columns(ctx, items, self.covis.decay, [d[2] for d in group])
                statics = [version.static(d[1], d[2]) for d in group]
            else:
                attrs = [d[2] for d in group]
                numeric, tables = self._token_columns(ctx, items, first.ts, first.views, attrs)
                statics = [self._static_part(item, tables[j], attrs[j])
                           for j, item in enumerate(items)]
            self._assemble(ctx.profile, numeric, cross, statics, members, out, wire)
        return out

    def _token_columns(self, ctx: UserContext, items: list[str], ts_ms: int,
                       views: FrozenViews | None, attrs: list[dict[str, Any] | None]
                       ) -> tuple[list[tuple[str, list[float]]], list[ItemTable | None]]:
        """``item_columns(ctx, items, ts_ms, views=views, attrs=attrs, mf_rowwise=True)``'s
        numeric columns as lists and each item's table, for the few tokens of a group
        that are written (one or two: a click, the kept negatives of a close) without its
        arrays: the snapshot columns (``_snapshot_columns``), the MF scores row by row
        (``_mf_rowwise``), then the user's columns (``user_columns``); the same floats
        by the same operations."""
        tables: list[ItemTable | None] = [None] * len(items)
        numeric: list[tuple[str, list[float]]] = []
        if views is not None and self.item_shard_of is not None:
            table_map = views.table_map()
            rows = self._count_rows(items, table_map)
            tables = [None if row is None else row[0] for row in rows]
            numeric = self._snapshot_columns(ctx, items, ts_ms, _has_any_channel(views),
                                             table_map, rows)
            mf = self._mf_rowwise(ctx.vector, items, views)
            if mf:
                numeric.append(("mf", mf))
        return numeric + user_columns(ctx, items, self.covis.decay, attrs), tables

    def _assemble(self, profile_in: dict[str, Any], numeric: list[tuple[str, list[float]]],
                  cross: list[list[dict[str, Any]]],
                  statics: list[tuple[dict[str, Any], dict[str, Any], EncodedPart | None]],
                  members: list[int], out: list[Any], wire: bool) -> None:
        """``resolve_all``'s merge of one group: each item's features (the user's profile
        ``profile_in``, its static features ``statics[j]``, its numeric values and cross
        profile values) into ``out[members[j]]``, as ``item_features`` builds them at
        example precision, or as their wire value where the parts encode."""
        # The profile compacted and rounded once, each item's static features once per
        # table version and attributes (``_static_part``): f({**a, **b}) == {**f(a),
        # **f(b)} for f = compact, float32_features when no name is in both.
        # ``wire``: the same merges as encoded parts (``join_parts``) where they encode.
        profile, profile_keys = float32_features(compact(profile_in)), profile_in.keys()
        part = encoded_part(profile) if wire else None
        # Items whose numeric values are all 0.0 and that have no cross features (in a
        # group with a seen item, the others): compact(rest) is empty, so their
        # features are the first merge's whenever the names are disjoint.
        names = [name for name, _ in numeric]
        zero: list[bool] = [False] * len(members)
        if numeric and "mf" not in names and profile_keys.isdisjoint(names):
            zero = [True] * len(members)
            for _, values in numeric:
                for j, value in enumerate(values):
                    if value != 0.0:
                        zero[j] = False
        for j, (static, static_rounded, static_part) in enumerate(statics):
            if (zero[j] and not cross[j] and profile_keys.isdisjoint(static)
                    and static.keys().isdisjoint(names)):
                out[members[j]] = (join_parts(part, static_part)
                                   if part is not None and static_part is not None
                                   else {**profile, **static_rounded})
                continue
            rest: dict[str, Any] = {}
            if numeric or cross[j]:
                rest = {name: values[j] for name, values in numeric}
                for feats in cross[j]:
                    rest.update(feats)
            if not rest and profile_keys.isdisjoint(static):
                if part is not None and static_part is not None:
                    out[members[j]] = join_parts(part, static_part)
                else:
                    out[members[j]] = {**profile, **static_rounded}
            elif (rest and static.keys().isdisjoint(rest) and profile_keys.isdisjoint(static)
                    and profile_keys.isdisjoint(rest)):
                rest = float32_features(compact(rest))
                rest_part = (encoded_part(rest) if part is not None and static_part is not None
                             else None)
                if rest_part is not None:
                    out[members[j]] = join_parts(part, static_part, rest_part)  # type: ignore[arg-type]
                else:
                    out[members[j]] = {**profile, **static_rounded, **rest}
            else:  # as item_features builds it
                out[members[j]] = float32_features(compact({**profile_in, **static, **rest}))

    def _resolve_plain(self, ctx: UserContext, items: list[str],
                       attrs_of: list[dict[str, Any] | None], seen: list[bool],
                       members: Iterable[int], out: list[Any], wire: bool) -> None:
        """``resolve_all`` of a group without snapshots and cross profiles (the joiner path of
        ``bench/joiner.py``; its tokens' items, attributes and seen flags given column-wise),
        into ``out[members[j]]``: an item is the user's profile and its
        static features (``_static_part``), plus for an item the user had interacted with
        its ``ui.*`` columns (``item_columns`` gives only those here: 0.0 for the others,
        compacted away), merged as ``resolve_all`` merges them; ``wire``: their wire value,
        the concatenation of the encoded parts, where each encodes as a part (the head of
        a profile and static part and the profile's values taken once per group and static
        names)."""
        profile = ctx.profile
        keys = profile.keys()
        named = bool(profile)  # an empty profile overlaps no item's names: tested once here
        rounded = float32_features(compact(profile))
        part = encoded_part(rounded) if wire else None
        statics, static_part_of = self._statics, self._static_part
        starts: dict[tuple[str, ...], list[Any]] = {}
        """Static names -> a row's head and profile values (``join_parts``' first items)."""
        plain_names: tuple[str, ...] | None = None
        """Static names (``_STATIC_NAMES``' object: every static feature kept its name)
        disjoint from the profile's, whose row head is ``plain_start``: an item not seen
        with a part of these names is that head and its values, tested by identity."""
        plain_start: list[Any] = []
        several = len(items) > 1  # (a group of one item has no later row to build so)
        recency: dict[str, float] | None = None
        for j, item, attrs, was_seen in zip(members, items, attrs_of, seen, strict=True):
            hit = statics.get(item)
            if hit is not None and hit[0] is None and hit[1] is attrs:
                static_part = hit[4]
                if static_part is not None and static_part[0] is plain_names and not was_seen:
                    out[j] = plain_start + static_part[1]  # the common row: as below, fewer steps
                    continue
                static, static_rounded = hit[2], hit[3]
            else:
                static, static_rounded, static_part = static_part_of(item, None, attrs)
            if was_seen:  # its ui.* columns (as resolve_all's general path merges them)
                if recency is None:
                    recency = liked_recency(ctx.liked, self.covis.decay)
                rest = {"ui.interacted": 1.0, "ui.liked": recency.get(item, 0.0)}
                if ((not named or keys.isdisjoint(static) and keys.isdisjoint(rest))
                        and static.keys().isdisjoint(rest)):
                    rest = float32_features(compact(rest))
                    rest_part = (encoded_part(rest) if part is not None and static_part is not None
                                 else None)
                    out[j] = (join_parts(part, static_part, rest_part)  # type: ignore[arg-type]
                              if rest_part is not None else {**rounded, **static_rounded, **rest})
                else:
                    out[j] = float32_features(compact({**profile, **static, **rest}))
            elif named and not keys.isdisjoint(static):
                out[j] = float32_features(compact({**profile, **static}))
            elif part is not None and static_part is not None:
                names = static_part[0]
                start = starts.get(names)
                if start is None:  # join_parts, once per static names of the group
                    row = out[j] = join_parts(part, static_part)
                    if type(row[0]) is str:
                        start = starts[names] = row[:len(row) - len(static_part[1])]
                else:
                    out[j] = start + static_part[1]
                if several and start is not None and _STATIC_NAMES.get(names) is names:
                    plain_names, plain_start = names, start  # (disjoint: tested above)
            else:
                out[j] = {**rounded, **static_rounded}

    def _static_part(self, item_id: str, table: ItemTable | None, attrs: dict[str, Any] | None
                     ) -> tuple[dict[str, Any], dict[str, Any], EncodedPart | None]:
        """``static_item_features`` of an item, the same at example precision
        (``float32_features(compact(...))``) and that as an ``EncodedPart`` (None when it
        holds a list), memoised per item for one table version and attributes object (both
        immutable once taken; the table held weakly, so the memo never keeps a replaced
        version alive); without a table, the results for equal attributes are shared by the
        process's shards (``_SHARED_STATICS``). All three are shared: never modified."""
        hit = self._statics.get(item_id)
        if hit is not None and hit[1] is attrs and (
                hit[0] is None if table is None else hit[0] is not None and hit[0]() is table):
            return hit[2], hit[3], hit[4]
        same = _SHARED_BY_ATTRS.get(id(attrs)) if table is None and attrs else None
        if same is not None and same[0] is attrs and same[1] == item_id:
            static, rounded, part = same[2]  # another shard's, from this very object
        else:
            attrs_key = _attrs_key(attrs) if table is None and attrs else None
            shared = None if attrs_key is None else _SHARED_STATICS.get((item_id, attrs_key))
            if shared is not None:  # another shard's, from attributes equal to these
                static, rounded, part = shared
            else:
                static = static_item_features(item_id, table, attrs)
                rounded = float32_features(compact(static))
                part = encoded_part(rounded)
                if part is not None and len(rounded) == len(static):  # every name kept
                    part = (_static_names(part[0]), part[1])
                if attrs_key is not None:
                    memo_put(_SHARED_STATICS, (item_id, attrs_key), (static, rounded, part),
                             MAX_STATIC_MEMO)
            if table is None and attrs:
                memo_put(_SHARED_BY_ATTRS, id(attrs), (attrs, item_id, (static, rounded, part)),
                         MAX_STATIC_MEMO)
        memo_put(self._statics, item_id, (None if table is None else weakref.ref(table), attrs,
                                          static, rounded, part), MAX_STATIC_MEMO)
        return static, rounded, part

    def _mf_rowwise(self, vector: np.ndarray | None, item_ids: list[str],
                    views: SnapshotViews | FrozenViews | None) -> list[float]:
        """``_mf_scores`` of each item alone (one vector lookup, one product per row: the
        bits of a one-item call); [] without a vector or an index."""
        index = (views or self.views).index if (views or self.views) is not None else None
        if vector is None or index is None or index.index is None:
            return []
        vecs, found = index.vectors(item_ids)
        v = np.asarray(vector, np.float32)
        return [float((vecs[j:j + 1] @ v)[0]) if ok else 0.0
                for j, ok in enumerate(found.tolist())]

    def _shared_context(self, user_id: str, ts_ms: int) -> _Shared:
        shared, group = self._shared, self.group
        if (shared is None or group is None or shared.group != group or shared.ts != ts_ms
                or shared.user_id != user_id):
            shared = _Shared(user_id, group, ts_ms, self.user(user_id, ts_ms))
            self._shared = shared if group is not None else None
        return shared

    def release_frozen(self) -> None:
        """Drop the cached ``FrozenViews`` (the views moved to new snapshot versions).
        The pending groups reading a version beyond the ``RETAINED_VERSIONS`` newest
        replaced ones still in use are detached from it (``_detach``: what their features
        read of it captured, per item, without computing them), so the version is
        freed; the others keep theirs until their window closes (memory for time). No
        token is computed here: each is when its example is written (a click, the
        sampler's keep at the window's close), from its version or its capture."""
        retained = self._retained
        if self._frozen is not None:
            retained.append(weakref.ref(self._frozen))
        self._frozen = None
        self._taken = None  # the last group's capture: never reused once its views moved
        live = [ref for ref in retained if ref() is not None]
        cut = max(len(live) - RETAINED_VERSIONS, 0)
        old = {id(ref()) for ref in live[:cut]}
        retained.clear()
        retained.extend(live[cut:])
        still: list[weakref.ref[_Taken]] = []
        by_version: dict[int, list[_Taken]] = {}
        for ref in self._open:
            taken = ref()
            if taken is None or taken.views is None:
                continue
            if id(taken.views) in old:
                by_version.setdefault(id(taken.views), []).append(taken)
            else:
                still.append(ref)
        self._open = still
        for takens in by_version.values():
            self._detach(takens)

    def _detach(self, takens: list[_Taken]) -> None:
        """Capture what the deferred features of the groups ``takens`` (taken on one
        snapshot version) read of it, then let the version go (``views = None``), once
        for all of them (``_VersionCapture``): per item its table's raw counts,
        ``table_capture`` and MF vector row; per table its time and half-lives and the
        co-visitation rows of the groups' seeds, each cut to the version's items
        (``_CapturedTable``). Nothing is computed per group: a token whose example is
        written gets its snapshot columns from the capture then (``resolve_all``)."""
        views = takens[0].views
        assert views is not None
        table_map = views.table_map() if self.item_shard_of is not None else None
        items_all = list(dict.fromkeys(itertools.chain.from_iterable([t.items for t in takens])))
        rows_all = (self._count_rows(items_all, table_map) if table_map is not None
                    else [None] * len(items_all))
        version = _VersionCapture(items_all, views, any(t.ctx.vector is not None for t in takens),
                                  rows_all)
        if table_map is not None:
            version.capture_tables(table_map, rows_all, self._seed_rows(
                takens, table_map, _has_any_channel(views), set(items_all)))
        for taken in takens:
            taken.detached = _Detached(version, taken.ctx.vector is not None
                                       and version.vecs is not None)
            taken.views = None
            taken.key = (id(taken), -1, -1)  # grouped with no other group's tokens
            taken.items = []

    def _seed_rows(self, takens: list[_Taken], table_map: dict[str, ItemTable],
                   any_channel: bool, items: set[str]
                   ) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
        """Per table shard, the co-visitation rows the groups ``takens`` read (each seed
        of each channel once, ``covis_row``), cut to ``items``: (channel, seed) ->
        neighbour -> weight, the same floats; an empty cut is left out."""
        assert self.item_shard_of is not None
        shard_of = self.item_shard_of
        out: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
        seen: set[tuple[str, str]] = set()
        for taken in takens:
            for name, seeds in self._seed_lists(taken.ctx, any_channel):
                for seed in seeds:
                    key = (name, seed)
                    if key in seen:
                        continue
                    seen.add(key)
                    shard = shard_of(seed)
                    table = table_map.get(shard)
                    if table is None:
                        continue
                    row = table.covis_row(name, seed)
                    common = row.keys() & items
                    if common:
                        out.setdefault(shard, {})[key] = {b: row[b] for b in common}
        return out

    def _snapshot_columns(self, ctx: UserContext, item_ids: list[str], ts_ms: int | None,
                          any_channel: bool, table_map: dict[str, Any],
                          rows: list[CountRow]) -> list[tuple[str, list[float]]]:
        """``item_columns(ctx, item_ids, ts_ms, views=views).numeric`` of a context without
        MF vector, history or category lifts, as lists: popularity and trending
        (``_decayed_counts`` of the items' ``rows``), then the co-visitation sums of
        ``ctx``'s seeds (``covis``, and ``covis_any`` when the tables carry that channel:
        ``any_channel``) in ``table_map`` (a version's tables or their capture); the same
        floats."""
        at = ts_ms or 0
        pop, trend = _decayed_counts(rows, at)
        sums = self._covis_sums(self._seed_lists(ctx, any_channel), item_ids, at, table_map)
        numeric = [("pop", pop), ("trend", trend), ("covis", sums["liked"])]
        if "any" in sums:
            numeric.append(("covis_any", sums["any"]))
        return numeric

    def polled(self) -> None:
        """The owner polled the views (``UserShard.process``, once per micro-batch, before
        any event): the frozen views are checked against them at their next use only,
        not at every impression, since snapshot versions are installed only by a poll
        (or ``SnapshotViews.wait_loaded``, never within a batch). An owner that never
        calls it gets the check at every use."""
        self._frozen_fresh = False
        self._frozen_trust = True

    def _frozen_views(self) -> FrozenViews | None:
        if self.views is None:
            return None
        frozen = self._frozen
        if frozen is not None and self._frozen_fresh:
            return frozen
        if frozen is None or not frozen.current(self.views):
            frozen = self._frozen = FrozenViews(self.views)
        self._frozen_fresh = self._frozen_trust
        return frozen

    def _cross(self, user_id: str, cache: dict[tuple[str, str], list[dict[str, Any]]],
               attrs: dict[str, Any] | None, ts_ms: int | None) -> list[dict[str, Any]]:
        """The user x item-attribute profile features of an item with ``attrs`` (one dict
        per ``user_x_<attr>`` profile whose attribute value is a string), memoised in
        ``cache`` by (attribute, value) (per request group, or per call) as a one-dict
        list: when one profile matches, that list is the answer, shared by the group's
        items of that value (never written; a deferred token holds it for minutes: one
        tracked list per value instead of one per impression); several make a new list."""
        out: list[dict[str, Any]] | None = None
        if attrs:
            for attr, store in self._crosses:
                value = attrs.get(attr)
                if isinstance(value, str):
                    hit = cache.get((attr, value))
                    if hit is None:
                        hit = cache[(attr, value)] = [
                            self._cross_query(user_id, store, value, ts_ms)]
                    out = hit if out is None else out + hit
        return [] if out is None else out

    @staticmethod
    def _cross_query(user_id: str, store: ProfileStore, value: str, ts_ms: int | None
                     ) -> dict[str, Any]:
        """The features of the ``(user_id, value)`` profile of a ``user_x_<attr>`` store
        (``_feature_value`` of each output); one shared ``FixedFeatures`` when the store
        has no such profile."""
        plan = _query_plan(store)
        key = store.plan.cross_key(user_id, value)  # store.key_of((user_id, value))
        if plan.empty is not None and not store.knows(key):
            return plan.empty
        out = store.query_key(key, _query_time(store, ts_ms))  # a fresh dict
        for name in plan.ts_names:
            out[name] = _feature_value(name, out[name], ts_ms)
        return out

    def cross_attrs(self) -> tuple[str, ...]:
        """The item attributes of the ``user_x_<attr>`` profiles."""
        return tuple(attr for attr, _ in self._crosses)

    def _cross_codes(self, user_id: str, coded: dict[str, tuple[list[str], np.ndarray]],
                     ts_ms: int | None) -> list[tuple[np.ndarray, list[dict[str, Any]]]]:
        """``_cross`` of every item column-wise: per cross profile, each item's value code
        (-1: no string value) and the features of each distinct value (queried once);
        ``coded``: ``ItemRows.value_codes`` of the items per attribute."""
        out = []
        for attr, store in self._crosses:
            values, codes = coded[attr]
            out.append((codes, self._cross_queries(user_id, store, values, ts_ms)))
        return out

    @staticmethod
    def _cross_queries(user_id: str, store: ProfileStore, values: list[str],
                       ts_ms: int | None) -> list[dict[str, Any]]:
        """``_cross_query`` of each value, the profiles read in one
        ``ProfileStore.query_keys`` call (the same dicts)."""
        plan = _query_plan(store)
        cross_key = store.plan.cross_key
        answers = store.query_keys([cross_key(user_id, v) for v in values],
                                   _query_time(store, ts_ms), plan.empty)
        if plan.ts_names:  # plan.empty is None then: every answer is a fresh dict
            for out in answers:
                for name in plan.ts_names:
                    out[name] = _feature_value(name, out[name], ts_ms)
        return answers

    def item_features(self, ctx: UserContext, item_ids: list[str], ts_ms: int | None,
                      covis: dict[str, SparseScores] | None = None, *,
                      views: SnapshotViews | FrozenViews | None = None,
                      attrs: list[dict[str, Any] | None] | None = None,
                      cross: list[list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
        """Per-item features, for each item; the same at impression time and at serving
        time: the item's static features (``static_item_features``), then its numeric
        snapshot features (``NUMERIC_ITEM_FEATURES``: popularity, trending, co-visitation
        with the recent items, MF score; ``ui.interacted`` / ``ui.liked`` when the user
        already interacted with some of the items), then the user x item-attribute profiles.

        ``covis``: the raw channel sums of ``Server.covis_channels`` (serving); None
        looks each item up (one impression at a time). Both give the same numbers.
        ``views``, ``attrs``, ``cross``: what to read instead of the current snapshots,
        catalog and cross profiles (what was taken earlier, for deferred features).
        """
        cols = self.item_columns(ctx, item_ids, ts_ms, covis, views=views, attrs=attrs,
                                 cross=cross)
        numeric = [(name, values.tolist()) for name, values in cols.numeric.items()]
        cross = cols.cross_lists()
        out = []
        for n, item in enumerate(item_ids):
            extra = static_item_features(item, cols.tables[n], cols.attrs[n])
            for name, values in numeric:
                extra[name] = values[n]
            for feats in cross[n]:
                extra.update(feats)
            out.append(extra)
        return out

    def item_columns(self, ctx: UserContext, item_ids: list[str], ts_ms: int | None,
                     covis: dict[str, SparseScores] | None = None, *,
                     views: SnapshotViews | FrozenViews | None = None,
                     attrs: list[dict[str, Any] | None] | None = None,
                     cross: list[list[dict[str, Any]]] | None = None,
                     rows: np.ndarray | None = None, space: ItemRows | None = None,
                     slots: np.ndarray | None = None, numeric_only: bool = False,
                     mf_rowwise: bool = False) -> ItemColumns:
        """The raw material of ``item_features`` column-wise, for vectorised scoring:
        numeric features as arrays, and per item its table, attributes and cross
        profile dicts (one shared dict per attribute value).

        ``rows``, ``space``: the items' rows in serving's ``ItemRows`` (whose id space is
        that of ``covis``): table values are read from its per-row arrays and the cross
        profiles are returned as ``cross_codes`` (the same numbers, no per-item lookups).
        ``slots``: the rows' slots in ``space`` when this request filled them already
        (after ``sync``; else ``space.fill(rows)``). ``numeric_only`` (with ``rows``,
        ``space``): only ``numeric`` without ``covis`` / ``covis_any`` (the pool ranker
        reads the channels itself) and ``slots``; no tables, attributes or cross profiles. ``mf_rowwise``: MF scores one row at a time
        (``_mf_rowwise``: the bits of one call per item, as examples take them) instead
        of one matrix product."""
        n = len(item_ids)
        tables: list[ItemTable | None] = [None] * n
        numeric_only = numeric_only and rows is not None and space is not None
        if attrs is None and not numeric_only:
            attrs = list(map(self.catalog.get, item_ids))
        numeric: dict[str, np.ndarray] = {}
        views = views or self.views
        arrays = rows is not None and space is not None
        if not arrays:
            slots = None
        if views is not None and self.item_shard_of is not None:
            at = ts_ms or 0
            table_map = views.table_map()
            if arrays:
                assert rows is not None and space is not None
                space.sync(table_map)
                if slots is None:
                    slots = space.fill(rows)
                shard = space.shard[slots]
                if not numeric_only:
                    tables = space.table_list(shard)
                numeric["pop"], numeric["trend"] = space.decayed_counts(shard, slots, at)
            else:
                rows_of = self._count_rows(item_ids, table_map)
                for j, row in enumerate(rows_of):
                    if row is not None:
                        tables[j] = row[0]
                pop, trend = _decayed_counts(rows_of, at)
                numeric["pop"], numeric["trend"] = np.array(pop), np.array(trend)
            if numeric_only:
                sums = {}
            elif covis is None:
                sums = {name: np.asarray(values, np.float64) for name, values in
                        self._covis_sums(self.seeds(ctx, views), item_ids, at,
                                         table_map).items()}
            elif arrays:
                assert rows is not None
                sums = {name: scores.at_rows(rows) for name, scores in covis.items()}
            else:
                sums = {name: np.asarray(scores.many(item_ids), np.float64)
                        for name, scores in covis.items()}
            liked_sums = sums.get("liked")
            if not numeric_only:
                numeric["covis"] = liked_sums if liked_sums is not None else np.zeros(n)
            if sums.get("any") is not None:
                numeric["covis_any"] = sums["any"]
            if mf_rowwise:
                rowwise = self._mf_rowwise(ctx.vector, item_ids, views)
                mf = np.asarray(rowwise, np.float64) if rowwise and item_ids else None
            else:
                mf = self._mf_scores(ctx.vector, item_ids, views, rows, space, slots)
            if mf is not None:
                numeric["mf"] = np.asarray(mf, np.float64)
        ui = user_item_columns(ctx, item_ids, self.covis.decay)
        if ui is not None:
            numeric.update(ui)
        if numeric_only:  # the pool ranker's columns: without the category posterior
            return ItemColumns(item_ids, numeric, tables, [None] * n, [], rows, space, slots)
        assert attrs is not None
        coded: dict[str, tuple[list[str], np.ndarray]] | None = None
        if arrays and cross is None:
            assert rows is not None and space is not None
            if slots is None:
                slots = space.fill(rows)
            cross_attrs = self.cross_attrs()
            space.fill_attrs(slots, attrs, cross_attrs, self.unavailable_attrs)
            coded = {attr: space.value_codes(attr, slots) for attr in cross_attrs}
        if ctx.categories is not None:  # by a user_x_category profile's codes if any
            numeric[CATEGORY_POSTERIOR] = ctx.categories.of(
                attrs, coded.get("category") if coded is not None else None)
        if cross is not None:
            return ItemColumns(item_ids, numeric, tables, attrs, cross)
        if arrays:
            assert coded is not None
            user_id = ctx.user_id
            return ItemColumns(item_ids, numeric, tables, attrs, None, rows, space, slots,
                               cross_query=lambda: self._cross_codes(user_id, coded, ts_ms))
        cache: dict[tuple[str, str], list[dict[str, Any]]] = {}
        cross = ([self._cross(ctx.user_id, cache, a, ts_ms) for a in attrs] if self._crosses
                 else [[] for _ in item_ids])
        return ItemColumns(item_ids, numeric, tables, attrs, cross)

    def _count_rows(self, item_ids: list[str], table_map: dict[str, ItemTable]
                    ) -> list[CountRow]:
        """Each item's ``CountRow`` in the tables of ``table_map``."""
        assert self.item_shard_of is not None
        shard_of = self.item_shard_of
        out: list[CountRow] = []
        for item in item_ids:
            table = table_map.get(shard_of(item))
            out.append(None if table is None else
                       (table, table.popular.get(item, 0.0), table.trending.get(item, 0.0)))
        return out

    def _covis_sums(self, seeds: list[tuple[str, list[str]]], item_ids: list[str], at: int,
                    table_map: dict[str, Any]) -> dict[str, list[float]]:
        """Per co-visitation channel of ``seeds`` (``seeds()``), each item's sum over its
        seeds (``_covis_lookup``) decayed to ``at`` (ms)."""
        return {name: self._covis_lookup(channel_seeds, name, item_ids, table_map, at)
                for name, channel_seeds in seeds}

    def seeds(self, ctx: UserContext, views: SnapshotViews | FrozenViews | None = None
              ) -> list[tuple[str, list[str]]]:
        """(channel, seeds newest first) of every co-visitation channel the loaded tables
        carry: recent positives for ``liked``, recent interactions for ``any``."""
        views = views or self.views
        return self._seed_lists(ctx, views is not None and _has_any_channel(views))

    def _seed_lists(self, ctx: UserContext, any_channel: bool) -> list[tuple[str, list[str]]]:
        """``seeds`` when the tables do (``any_channel``) or do not carry ``any``."""
        n = self.covis.recent_items
        out = [("liked", ctx.liked[:n])]
        if any_channel:
            out.append(("any", ctx.recent[:n]))
        return out

    def _covis_lookup(self, seeds: list[str], name: str, item_ids: list[str],
                      tables: dict[str, Any], ts_ms: int,
                      weights: list[float] | None = None) -> list[float]:
        """``sum_k decay**k covis(seed_k, item)`` for the given items only (impressions);
        ``weights``: each seed's weight instead of ``decay**k``. ``tables``: item tables
        (or their ``_CapturedTable``) by shard."""
        assert self.item_shard_of is not None
        wanted = [0.0] * len(item_ids)
        q = self.covis.decay
        weight = 1.0
        shard_of = self.item_shard_of
        factors: dict[int, float] = {}  # per table: its decay to ts_ms
        single = item_ids[0] if len(item_ids) == 1 else None
        for k, seed in enumerate(seeds):
            table = tables.get(shard_of(seed))
            if table is not None:
                row = table.covis_row(name, seed)
                if row:
                    f = factors.get(id(table))
                    if f is None:
                        f = factors[id(table)] = table.covis_factor(ts_ms)
                    wf = (weight if weights is None else weights[k]) * f
                    if single is not None:  # one impression or example: one lookup
                        v = row.get(single)
                        if v is not None:
                            wanted[0] += wf * v
                    else:
                        for n, item in enumerate(item_ids):
                            v = row.get(item)
                            if v is not None:
                                wanted[n] += wf * v
            weight *= q
        return wanted

    def _mf_scores(self, vector: np.ndarray | None, item_ids: list[str],
                   views: SnapshotViews | FrozenViews | None = None,
                   rows: np.ndarray | None = None, space: ItemRows | None = None,
                   slots: np.ndarray | None = None) -> np.ndarray | None:
        views = views or self.views
        index = views.index if views is not None else None
        if vector is None or index is None or index.index is None or not item_ids:
            return None
        if rows is not None and space is not None and slots is not None:
            vecs, found = space.vectors(slots, rows, index.index)
        else:
            vecs, found = index.vectors(item_ids)
        scores = vecs @ np.asarray(vector, np.float32)
        return np.where(found, scores, 0.0)

    # -- items ---------------------------------------------------------------------
    def unavailable(self, item_id: str) -> bool:
        """True when the shard's own catalog (fed by broadcast ``item`` events) already
        knows the item is unavailable, before its item table is republished."""
        return self.unavailable_attrs(self.catalog.get(item_id))

    @staticmethod
    def unavailable_attrs(attrs: dict[str, Any] | None) -> bool:
        """``unavailable`` of an item with these catalog attributes (None: not known)."""
        return attrs is not None and attrs.get("available", True) is False

    def item_vectors(self, items: list[str]) -> np.ndarray:
        """Items' MF vectors from the newest index snapshot, else their deterministic
        initial vectors (user and item tables share init params)."""
        assert self.users is not None
        index = self.views.index if self.views is not None else None
        if index is None or index.index is None:
            return self.users.table.initial_vectors(keys_of(items))
        vecs, found = index.vectors(items)  # a new array
        if not found.all():  # initial vectors of the others (each row a function of its id)
            missing = np.flatnonzero(~found)
            vecs[missing] = self.users.table.initial_vectors(
                keys_of([items[j] for j in missing.tolist()]))
        return vecs

    def negative_pool(self) -> list[str]:
        """Items to sample BPR negatives from: the newest index snapshot, else the catalog.
        A frozen index's list is made once per index version for every user shard of the
        process (``_POOLS``; callers must not modify it)."""
        index = self.views.index if self.views is not None else None
        if index is not None and index.index is not None:
            snapshot = index.index
            if not getattr(snapshot, "frozen", False):
                return snapshot.item_ids()
            pool = _POOLS.get(snapshot)
            if pool is None:  # immutable: its items stay these
                pool = _POOLS[snapshot] = snapshot.item_ids()
            return pool
        return [i for i, attrs in self.catalog.items() if attrs.get("available", True)]


_POOLS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
"""``PointInTime.negative_pool``'s lists by frozen index version (the user shards of a
process load the same versions), dropped with the version; not part of any recovery
state."""


class _Shared:
    """One user's context shared by a group of events (see ``example_features``)."""

    __slots__ = ("user_id", "group", "ts", "ctx", "crosses")

    def __init__(self, user_id: str, group: object, ts: int, ctx: UserContext) -> None:
        self.user_id = user_id
        self.group = group
        self.ts = ts
        self.ctx = ctx
        self.crosses: dict[tuple[str, str], list[dict[str, Any]]] = {}


class _Taken:
    """What the deferred features of one group of impressions share (a request's, taken
    together): the user context, the time and the snapshots served. One per group
    instead of three fields per impression."""

    __slots__ = ("ctx", "ts", "views", "key", "items", "detached", "__weakref__")

    def __init__(self, ctx: UserContext, ts: int, views: FrozenViews | None) -> None:
        self.ctx = ctx
        self.ts = ts
        self.views = views
        self.key = (id(ctx), ts, id(views))
        """What ``resolve_all`` groups by (the same user context, time and snapshots)."""
        self.items: list[str] = []
        """The items of the tokens taken in this group (with repeats), for ``detach``."""
        self.detached: _Detached | None = None
        """What the group's features read of ``views``, once they were let go."""


class _Detached:
    """What the deferred features of one group (``_Taken``) read of a snapshot version
    that was replaced, captured when it is let go (``PointInTime.release_frozen``) so
    that the version is freed without computing every pending impression's features:
    the capture shared by the groups detached from one version (``_VersionCapture``:
    per item its raw counts, ``table_capture`` and MF vector row; per table the rows of
    the groups' seeds). Everything is computed for the few tokens whose example is
    written (``PointInTime.resolve_all``: the snapshot columns, then ``columns``): the
    same operations on the same values as ``item_columns`` on the version."""

    __slots__ = ("version", "mf_on", "mf")

    def __init__(self, version: _VersionCapture, mf_on: bool) -> None:
        self.version = version
        self.mf_on = mf_on
        """Whether the group had an MF score (a user vector and an index)."""
        self.mf: dict[int, float] = {}
        """MF scores computed so far, by the item's index in ``version``."""

    def columns(self, ctx: UserContext, items: list[str], decay: float,
                attrs: list[dict[str, Any] | None]) -> list[tuple[str, list[float]]]:
        """``item_columns(...).numeric`` of ``items`` (of this group, ``attrs``: their
        attributes as taken) for ``ctx`` (``as_taken``) after the snapshot columns, each
        column a list: the MF scores row by row (``PointInTime._mf_rowwise``), ``ui.*``
        (``user_item_columns``), then the category posterior (``ctx.categories``)."""
        out: list[tuple[str, list[float]]] = []
        if self.mf_on and items:
            version, memo = self.version, self.mf
            vecs, found = version.vecs, version.found
            assert vecs is not None and found is not None
            v = np.asarray(ctx.vector, np.float32)
            scores = []
            for k in map(version.pos.__getitem__, items):
                score = memo.get(k)
                if score is None:
                    score = memo[k] = float((vecs[k:k + 1] @ v)[0]) if found[k] else 0.0
                scores.append(score)
            out.append(("mf", scores))
        return out + user_columns(ctx, items, decay, attrs)


def user_columns(ctx: UserContext, items: list[str], decay: float,
                 attrs: list[dict[str, Any] | None]) -> list[tuple[str, list[float]]]:
    """The numeric columns of ``items`` (their catalog attributes ``attrs``) that come
    from the user alone, as lists in ``item_columns``' order: ``ui.*``
    (``user_item_columns``), then the category posterior (``ctx.categories``)."""
    out: list[tuple[str, list[float]]] = []
    ui = user_item_columns(ctx, items, decay)
    if ui is not None:
        out += [(name, values.tolist()) for name, values in ui.items()]
    if ctx.categories is not None:
        out.append((CATEGORY_POSTERIOR, ctx.categories.of(attrs).tolist()))
    return out


class _CapturedTable:
    """What the groups detached from a version read of one of its item tables: its
    shard, time and half-lives, and the co-visitation rows of their seeds cut to the
    version's items (``PointInTime._seed_rows``). Answers the ``ItemTable`` reads of
    ``_decayed_counts`` and ``PointInTime._covis_lookup`` with the same floats, without
    holding the table."""

    __slots__ = ("shard", "ts", "popular_half_life_ms", "trending_half_life_ms",
                 "covis_half_life_ms", "rows")

    def __init__(self, table: ItemTable, rows: dict[tuple[str, str], dict[str, float]]
                 ) -> None:
        self.shard = table.shard
        self.ts = table.ts
        self.popular_half_life_ms = table.popular_half_life_ms
        self.trending_half_life_ms = table.trending_half_life_ms
        self.covis_half_life_ms = table.covis.config.half_life_ms
        self.rows = rows
        """(channel, seed) -> neighbour -> weight decayed to ``ts`` (``covis_row``)."""

    decay_factor = ItemTable.decay_factor

    def covis_factor(self, now_ms: int) -> float:
        """``ItemTable.covis_factor``."""
        return decay_factor(now_ms - self.ts, self.covis_half_life_ms)

    def covis_row(self, name: str, item_id: str) -> dict[str, float]:
        """``ItemTable.covis_row`` cut to the version's items (empty: none of them)."""
        return self.rows.get((name, item_id), _NO_ROW)


_NO_ROW: dict[str, float] = {}
"""The row of a seed with no neighbour among a capture's items (never written)."""


class _VersionCapture:
    """What the groups detached from one snapshot version together share: each of their
    items' ``table_capture``, MF vector row in the version's index, raw counts and,
    once asked, its static features, and its tables' ``_CapturedTable`` (one lookup
    or computation per item and version instead of one per group). Holds nothing of
    the version itself."""

    __slots__ = ("pos", "vecs", "found", "captures", "statics", "tables", "counts",
                 "any_channel")

    def __init__(self, items: list[str], views: FrozenViews, vectors: bool,
                 rows: list[CountRow]) -> None:
        """``rows``: each item's ``CountRow`` (its table: ``table_capture``)."""
        self.pos = {item: k for k, item in enumerate(items)}
        """Item -> its row in ``vecs``."""
        self.vecs: np.ndarray | None = None
        self.found: list[bool] | None = None
        index = views.index
        if vectors and items and index.index is not None:
            self.vecs, found = index.vectors(items)
            self.found = found.tolist()
        self.captures: dict[str, TableCapture] = {
            item: shared_capture(item, row[0]) if row is not None else None
            for item, row in zip(items, rows, strict=True)}
        """Item -> its ``table_capture`` (None: no table holds it)."""
        self.statics: dict[str, tuple[Any, dict[str, Any], dict[str, Any],
                                      EncodedPart | None]] = {}
        """``static``'s memo: item -> (the attributes object it holds for, the static
        features, at example precision, as a part); shared, never modified."""
        self.tables: dict[str, _CapturedTable] | None = None
        """The version's tables by shard, captured (None: no item shards)."""
        self.counts: dict[str, tuple[str, float, float] | None] = {}
        """Item -> its ``CountRow`` with its table's shard in ``tables`` instead of the
        table (``count_rows``): a tuple of atomic values, which the collector untracks
        (one holding a ``_CapturedTable`` stays tracked while its tokens wait)."""
        self.any_channel = _has_any_channel(views)
        """Whether the tables carry the ``any`` co-visitation channel."""

    def capture_tables(self, table_map: dict[str, ItemTable], rows: list[CountRow],
                       seed_rows: dict[str, dict[tuple[str, str], dict[str, float]]]) -> None:
        """Fill ``tables`` from ``table_map`` and ``seed_rows`` (per shard, the rows the
        groups read) and ``counts`` from the items' ``rows`` (as given to ``__init__``)."""
        self.tables = {shard: _CapturedTable(table, seed_rows.get(shard, {}))
                       for shard, table in table_map.items()}
        shard_of = {id(table): shard for shard, table in table_map.items()}
        self.counts = {item: None if row is None else (shard_of[id(row[0])], row[1], row[2])
                       for item, row in zip(self.pos, rows, strict=True)}

    def count_rows(self, items: list[str]) -> list[CountRow]:
        """Each item's ``CountRow`` on the captured ``tables`` (fresh tuples, dropped
        after use)."""
        tables, counts = self.tables, self.counts
        assert tables is not None
        out: list[CountRow] = []
        for item in items:
            row = counts[item]
            out.append(None if row is None else (tables[row[0]], row[1], row[2]))
        return out

    def static(self, item: str, attrs: dict[str, Any] | None
               ) -> tuple[dict[str, Any], dict[str, Any], EncodedPart | None]:
        """``PointInTime._static_part`` of ``item`` on the captured version, with
        ``attrs`` (the item's attributes when its token was taken): computed once per
        item and attributes object for every group detached from the version."""
        hit = self.statics.get(item)
        if hit is not None and hit[0] is attrs:
            return hit[1], hit[2], hit[3]
        static = static_features_of(self.captures[item], attrs)
        rounded = float32_features(compact(static))
        part = encoded_part(rounded)
        self.statics[item] = (attrs, static, rounded, part)
        return static, rounded, part


Deferred = tuple[_Taken, str, "dict[str, Any] | None", "list[dict[str, Any]]", bool]
"""An impression's features taken but not computed (``PointInTime.deferred_features``):
(its group's ``_Taken``, the item id, the item's attributes then, its user x attribute
profile values then, whether the user had interacted with the item then:
``ctx.consumed`` is the live history, later interactions must not leak into ``ui.*``).
A tuple, not an object with an ``__init__``: one is made per impression. Never pickled:
the joiner computes its tokens before a snapshot (``Joiner.__getstate__``)."""

_NO_CROSS: list[dict[str, Any]] = []
"""The cross profile values of every token without any (never written)."""


def _has_any_channel(views: SnapshotViews | FrozenViews) -> bool:
    """Whether the loaded item tables carry the ``any`` co-visitation channel."""
    tables = views.loaded_tables()
    return bool(tables) and tables[0].covis_any is not None


def as_taken(ctx: UserContext, deferred: list[Deferred]) -> UserContext:
    """``ctx`` with ``consumed`` as it was for the ``deferred`` items when they were taken
    (the only use item features make of it is membership)."""
    taken = object.__new__(UserContext)  # dataclasses.replace, without its 9 us per impression
    taken.__dict__.update(ctx.__dict__)
    taken.consumed = {d[1]: 0 for d in deferred if d[4]}
    return taken


class FixedFeatures(dict):  # type: ignore[type-arg]
    """Features that every query finding no profile shares (a store's empty outputs):
    one object per store, never modified, so readers may memoise what they derive from
    it by identity (``ColumnScorer``)."""


class _QueryPlan:
    """Per profile store: its outputs that ``_feature_value`` changes and its shared
    empty features (None when they depend on the query time or hold lists)."""

    def __init__(self, store: ProfileStore) -> None:
        self.ts_names = [name for name in store.output_names if name.endswith("_ts.all")]
        fixed = not self.ts_names and not store.plan.list_outs
        self.empty = FixedFeatures(store.empty_answer()) if fixed else None


_QUERY_PLANS: dict[int, tuple[weakref.ref[ProfileStore], _QueryPlan]] = {}
"""``_query_plan``'s plans by ``id(store)``, with a weak reference to the store (its entry
leaves when the store dies): one dict lookup per query, without a ``WeakKeyDictionary``'s
Python-level ``get`` (every user context and cross profile query asks)."""


def _query_plan(store: ProfileStore) -> _QueryPlan:
    held = _QUERY_PLANS.get(id(store))
    if held is not None and held[0]() is store:
        return held[1]
    plan = _QueryPlan(store)
    key = id(store)
    _QUERY_PLANS[key] = (weakref.ref(store, lambda _, key=key: _QUERY_PLANS.pop(key, None)),
                         plan)
    return plan


def _query_time(store: ProfileStore, ts_ms: int | None) -> int | None:
    """Query the current profile (fast path) unless events after ``ts_ms`` were applied.

    In order, the store's clock is at most ``ts_ms`` when an event is processed, so the
    current profile holds only earlier events (and same-millisecond ones); windows then
    end at the store clock instead of exactly at ``ts_ms``. After an out-of-order
    arrival the exact past query runs instead (events strictly before ``ts_ms``).
    """
    if ts_ms is None or store.now is None or store.now <= ts_ms:
        return None
    return ts_ms


def _feature_value(name: str, value: Any, ts_ms: int | None) -> Any:
    """Profile outputs as model features: timestamps become ages in seconds."""
    if name.endswith("_ts.all") and isinstance(value, int | float) and ts_ms is not None:
        return (ts_ms - value) / 1000.0
    return value
