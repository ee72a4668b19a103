"""Exact fast scoring of a River ``LogisticRegression`` serving ranker (kind ``lr``)."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import numpy as np
from river import linear_model, optim
from river.utils.math import sigmoid
from river.utils.vectordict import VectorDict

from models.calibration import correct_downsampled_many
from models.features import Features, add_feature, item_part, join_features, shared_features
from models.rankers import Ranker
from operators.point_in_time import ItemColumns, static_item_features
from state.item_rows import ItemRows
from state.item_table import ItemTable

log = logging.getLogger(__name__)


class LinearScorer:
    """Exact fast path of a River ``LogisticRegression`` serving ranker (kind ``lr``).

    ``Ranker.predict_many(ranking_features_many(...))`` copies the ~100 shared
    (user, time, context, profile) features into every candidate's dict and runs a
    ~100-term dot product per candidate. River's dot walks the feature dict in its
    order, adding ``w[name] * value`` for the names it has a weight for; a candidate's
    dict is the shared features followed by its own part (``item_part``), so summing
    the shared terms once per request and continuing that sum with each candidate's
    part adds exactly the same floats in the same order. Scores are bitwise equal to
    River's (checked against the model when a snapshot is first used, and in
    ``tests/test_serving_fast.py``); a candidate whose part cannot be split off
    (it overrides a profile key) is scored through its full dict the same way.
    """

    def __init__(self, ranker: Ranker) -> None:
        model = ranker.model
        self.n_learned = ranker.n_learned
        self.weights: dict[str, float] = model._weights.to_dict()
        self.intercept = float(model.intercept)
        self.rate = ranker.rate

    @staticmethod
    def supports(ranker: Ranker) -> bool:
        """A frozen serving copy of a River LogisticRegression (log loss, weight dict)."""
        model = ranker.model
        return (ranker.kind == "lr" and ranker.frozen
                and type(model) is linear_model.LogisticRegression
                and type(model.loss) is optim.losses.Log
                and type(getattr(model, "_weights", None)) is VectorDict
                and isinstance(getattr(model, "intercept", None), float))

    def agrees_with(self, ranker: Ranker) -> bool:
        """Self-check against River on dicts built from the model's own weights."""
        names = list(self.weights)[:64]
        probes = [{}, {"__missing__": 1.0}]
        for k in (1, 2, 3):
            x = {name: (-1.0) ** i * (i + k) / 7.0 for i, name in enumerate(reversed(names))}
            x["__missing__"] = 2.5
            probes.append(x)
        for x in probes:
            mine = sigmoid(self._dot(x, 0.0) + self.intercept)
            if mine != ranker.model.predict_proba_one(x).get(True, 0.0):
                return False
        return True

    def _dot(self, x: Features, start: float) -> float:
        get = self.weights.get
        s = start
        for name, value in x.items():
            w = get(name)
            if w is not None:
                s += w * value
        return s

    def predict_many(self, user_id: str, item_ids: list[str], ts_ms: int,
                     context: dict[str, Any] | None, position: int | None,
                     user_extra: dict[str, Any] | None,
                     item_extras: list[dict[str, Any]]) -> np.ndarray:
        """Calibrated P(positive) per item: equal to ``ranker.predict_many(
        ranking_features_many(user_id, item_ids, ts_ms, context, position, user_extra,
        item_extras))``."""
        get = self.weights.get
        shared = shared_features(user_id, ts_ms, context, position, user_extra)
        base = self._dot(shared, 0.0)
        intercept = self.intercept
        out = np.empty(len(item_ids), np.float64)
        for n, (item, extra) in enumerate(zip(item_ids, item_extras, strict=True)):
            part = item_part(shared, user_extra, item, extra)
            if part is None:
                s = self._dot(join_features(shared, user_extra, item, extra), 0.0)
            else:
                s = base
                for name, value in part.items():
                    w = get(name)
                    if w is not None:
                        s += w * value
            out[n] = sigmoid(s + intercept)
        return correct_downsampled_many(out, self.rate)


_SCORERS: weakref.WeakKeyDictionary[Ranker, LinearScorer | None] = weakref.WeakKeyDictionary()
_SCORERS_LOCK = threading.Lock()


def linear_scorer(ranker: Ranker) -> LinearScorer | None:
    """The ``LinearScorer`` of a serving ranker snapshot, or None if it has none (other
    kinds, a ranker that can still learn, or a River version whose predictions it does
    not reproduce). Built once per snapshot object (its weights copied once) and shared
    by every server in the process: snapshots are immutable and shared through
    ``SnapshotReader``'s cache."""
    with _SCORERS_LOCK:
        if ranker in _SCORERS:
            known = _SCORERS[ranker]
            if known is None or known.n_learned == ranker.n_learned:
                return known
    scorer = None
    if LinearScorer.supports(ranker):
        scorer = LinearScorer(ranker)
        if not scorer.agrees_with(ranker):
            log.warning("LinearScorer disagrees with River on %r; serving through River", ranker)
            scorer = None
    with _SCORERS_LOCK:
        _SCORERS[ranker] = scorer
    return scorer


_MAX_UNPUBLISHED = 100_000
"""Most memoised static terms of items outside every loaded table, per ranker."""


class ColumnScorer:
    """Vectorised scoring of a ``LinearScorer`` over ``ItemColumns`` (operators/point_in_time.py).

    The logit of a candidate is ``intercept + w . shared + w . item part``; the item part
    splits into terms that change only with the item's table version or attributes
    (``item=<id>``, item profile, category and attributes: computed once per ranker,
    table version and attribute object, memoised on the table), terms shared by every
    item with the same attribute value (user x attribute profiles: once per request and
    value) and the numeric snapshot features (``w * signed_log(x)`` over arrays). The
    sums are those of River's dot product in another order: equal within 1e-9, not
    bitwise (``LinearScorer.predict_many`` is the bitwise path).
    """

    def __init__(self, scorer: LinearScorer) -> None:
        self.scorer = scorer
        self._no_table: dict[str, tuple[dict[str, Any] | None, float, frozenset[str]]] = {}
        """Static terms of items outside every loaded table, by item id."""

    def predict(self, user_id: str, ts_ms: int, context: dict[str, Any] | None,
                position: int | None, user_extra: dict[str, Any] | None,
                cols: ItemColumns) -> np.ndarray | None:
        """Calibrated P(positive) per candidate, or None when an item feature would
        override a user feature (then only the per-dict path is exact)."""
        user_keys = user_extra.keys() if user_extra else frozenset()
        if user_keys and any(name in user_keys for name in cols.numeric):
            return None
        scorer = self.scorer
        weights = scorer.weights
        shared = shared_features(user_id, ts_ms, context, position, user_extra)
        n = len(cols.item_ids)
        logit = np.full(n, scorer._dot(shared, 0.0) + scorer.intercept)
        used = [(w, values) for name, values in cols.numeric.items()
                if (w := weights.get(name)) is not None]
        if used:  # signed_log of every used column at once, then added column by column
            x = np.stack([values for _, values in used])
            x = np.where(np.isfinite(x), x, 0.0)
            x = np.sign(x) * np.log1p(np.abs(x))
            for k, (w, _) in enumerate(used):
                logit += w * x[k]
        static = self._static_rows(cols, user_keys) if cols.space is not None else None
        if static is not None:
            logit += static
            return self._probability(logit)
        static = np.empty(n)
        cross_terms: dict[int, float] = {}
        cross = cols.cross_lists()
        for j, item in enumerate(cols.item_ids):
            term, keys = self._static(item, cols.tables[j], cols.attrs[j])
            if user_keys and not keys.isdisjoint(user_keys):
                return None
            for feats in cross[j]:
                t = cross_terms.get(id(feats))
                if t is None:
                    if user_keys and not user_keys.isdisjoint(feats):
                        return None
                    t = cross_terms[id(feats)] = self._sum(feats)
                term += t
            static[j] = term
        logit += static
        return self._probability(logit)

    def _probability(self, logit: np.ndarray) -> np.ndarray:
        p = np.where(logit < -30, 0.0, np.where(logit > 30, 1.0,
                                                1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))))
        return correct_downsampled_many(p, self.scorer.rate)

    def _static_rows(self, cols: ItemColumns, user_keys: Any) -> np.ndarray | None:
        """Static + cross terms of every candidate from per-row memo arrays (the array
        path: ``cols.rows`` in ``cols.space``), in the order of the per-item loop (static
        term, then each cross profile's term), so the sums are the loop's; None when a
        feature key could override a user feature (the loop then decides exactly)."""
        space, slots = cols.space, cols.slots
        assert space is not None and slots is not None
        memo = space.memo.get(ColumnScorer)
        if memo is None or memo.scorer is not self:
            memo = space.memo[ColumnScorer] = _StaticRows(self)
        static = memo.terms(space, slots, cols)
        if user_keys and not memo.keys.isdisjoint(user_keys):
            return None
        for codes, feats in cols.cross_codes or ():
            if not feats:
                continue
            if user_keys and any(not user_keys.isdisjoint(f) for f in feats):
                return None
            terms = np.array([self._sum(f) for f in feats] + [0.0])
            static = static + terms[codes]  # code -1 reads the trailing 0.0
        return static

    def _static(self, item: str, table: ItemTable | None,
                attrs: dict[str, Any] | None) -> tuple[float, frozenset[str]]:
        """(sum of the item's static terms incl. ``item=<id>``, the static feature keys)."""
        memo = self._no_table if table is None else table.memo.setdefault(self, {})
        hit = memo.get(item)
        if hit is not None and hit[0] is attrs:
            return hit[1], hit[2]
        term, keys = self._static_term(item, table, attrs)
        if table is None and len(memo) >= _MAX_UNPUBLISHED:
            memo.clear()  # bounded: items outside every table are few and short-lived
        memo[item] = (attrs, term, keys)
        return term, keys

    def _static_term(self, item: str, table: ItemTable | None, attrs: dict[str, Any] | None
                     ) -> tuple[float, frozenset[str]]:
        extra = static_item_features(item, table, attrs)
        return self.scorer.weights.get(f"item={item}", 0.0) + self._sum(extra), frozenset(extra)

    def _sum(self, extra: dict[str, Any]) -> float:
        """``w . x`` over the features ``extra`` expands to (``models.features``)."""
        part: Features = {}
        for key, value in extra.items():
            add_feature(part, key, value)
        get = self.scorer.weights.get
        return sum(w * v for name, v in part.items() if (w := get(name)) is not None)


class _StaticRows:
    """One ``ColumnScorer``'s static item terms per slot of an ``ItemRows``: valid while
    the row's attributes object is the one it was computed from (kept, so its ``id``
    cannot be reused meanwhile) and its table's generation is the one it was read from,
    or a newer table gives the item the same profile and category (tables are
    republished often; most items' static features do not change)."""

    def __init__(self, scorer: ColumnScorer) -> None:
        self.scorer = scorer
        self.term = np.zeros(0)
        self.gen = np.zeros(0, np.int64)
        self.attr_id = np.zeros(0, np.int64)
        self.attrs = np.zeros(0, object)
        self.source = np.zeros(0, object)
        """What the term read from the item's table: (has a table, profile, category)."""
        self.keys: set[str] = set()
        """Every static feature key memoised (checked against the user's keys)."""

    def _grow(self, size: int) -> None:
        old = self.term.size
        if old >= size:
            return
        self.term = np.concatenate([self.term, np.zeros(size - old)])
        self.gen = np.concatenate([self.gen, np.full(size - old, -1, np.int64)])
        self.attr_id = np.concatenate([self.attr_id, np.zeros(size - old, np.int64)])
        self.attrs = np.concatenate([self.attrs, np.full(size - old, None, object)])
        self.source = np.concatenate([self.source, np.full(size - old, None, object)])

    def terms(self, space: ItemRows, slots: np.ndarray, cols: ItemColumns) -> np.ndarray:
        self._grow(space.capacity)
        gen = space.shard_gen[space.shard[slots]]
        attr_ids = np.fromiter(map(id, cols.attrs), np.int64, len(cols.attrs))
        stale = np.flatnonzero((self.gen[slots] != gen) | (self.attr_id[slots] != attr_ids))
        if not stale.size:
            return self.term[slots]
        rows = slots[stale]
        # plain lists for the loop (numpy scalar reads and writes cost ~10x a list's);
        # slots are distinct within a request, so the writes can wait for the end
        new_ids = attr_ids[stale].tolist()
        old_ids = self.attr_id[rows].tolist()
        old_sources = self.source[rows].tolist()
        changed: list[int] = []
        terms: list[float] = []
        sources: list[Any] = []
        attrs_new: list[Any] = []
        items, tables, attrs_of = cols.item_ids, cols.tables, cols.attrs
        for n, j in enumerate(stale.tolist()):
            item, table, attrs = items[j], tables[j], attrs_of[j]
            source = _table_source(item, table)
            if old_ids[n] != new_ids[n] or old_sources[n] != source:
                term, keys = self.scorer._static_term(item, table, attrs)
                self.keys.update(keys)
                changed.append(n)
                terms.append(term)
                sources.append(source)
                attrs_new.append(attrs)
        if changed:
            at = rows[changed]
            self.term[at] = terms
            self.attr_id[at] = attr_ids[stale][changed]
            for r, attrs, source in zip(at.tolist(), attrs_new, sources, strict=True):
                self.attrs[r] = attrs  # one by one: numpy would unpack tuples
                self.source[r] = source
        self.gen[rows] = gen[stale]
        return self.term[slots]


def _table_source(item: str, table: ItemTable | None) -> tuple[Any, ...]:
    """What ``static_item_features`` reads from the item's table."""
    if table is None:
        return (False,)
    entry = table.catalog.get(item)
    return (True, table.features.get(item), entry.category if entry else None)


_COLUMN_SCORERS: weakref.WeakKeyDictionary[LinearScorer, ColumnScorer] = weakref.WeakKeyDictionary()


def column_scorer(scorer: LinearScorer) -> ColumnScorer:
    """The one ``ColumnScorer`` of a ``LinearScorer`` in this process (its memos shared)."""
    with _SCORERS_LOCK:
        found = _COLUMN_SCORERS.get(scorer)
        if found is None:
            found = _COLUMN_SCORERS[scorer] = ColumnScorer(scorer)
        return found
