"""Exact fast scoring of a River ``LogisticRegression`` serving ranker (kind ``lr``)."""

from __future__ import annotations

import logging
import math
import threading
import weakref
from itertools import chain
from typing import Any

import numpy as np
from river import linear_model, optim
from river.utils.math import sigmoid
from river.utils.vectordict import VectorDict

from models.calibration import correct_downsampled_many
from models.features import Features, add_feature, item_part, join_features, shared_features
from models.rankers import Ranker
from operators.point_in_time import FixedFeatures, ItemColumns, static_item_features
from state.item_rows import ItemRows
from state.item_table import ItemTable

log = logging.getLogger(__name__)
_isfinite = math.isfinite
_log1p = math.log1p


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


MAX_ATTR_MEMO = 4_096
"""Distinct attribute sets whose static term ``ColumnScorer`` keeps (cleared when full)."""

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
        self._fixed: dict[int, tuple[FixedFeatures, float]] = {}
        """``_sum`` of each ``FixedFeatures`` object (kept, so its id stays its own)."""
        self._attr_memo: dict[tuple[Any, ...], tuple[float, tuple[str, ...]]] = {}
        """``_sum`` and keys of the ``i:<attr>`` features of catalog attributes, by their
        content (names, types, values in dict order; ``_StaticRows._attr_terms``): one
        sum per distinct set of attributes for every user shard's slots. The keys are a
        tuple, not a frozenset: kept for the memo's life, a tuple of strings is untracked
        by the collector (a set never is)."""

    def predict(self, user_id: str, ts_ms: int, context: dict[str, Any] | None,
                position: int | None, user_extra: dict[str, Any] | None,
                cols: ItemColumns) -> np.ndarray | None:
        """Calibrated P(positive) per candidate, or None when an item feature would
        override a user feature (then only the per-dict path is exact)."""
        user_keys = user_extra.keys() if user_extra else frozenset()
        if user_keys and not user_keys.isdisjoint(cols.numeric):
            return None
        scorer = self.scorer
        weights = scorer.weights
        shared = shared_features(user_id, ts_ms, context, position, user_extra)
        n = len(cols.item_ids)
        logit = np.full(n, scorer._dot(shared, 0.0) + scorer.intercept)
        used = [(w, values) for name, values in cols.numeric.items()
                if (w := weights.get(name)) is not None]
        if used:  # signed_log of every used column at once, then added column by column
            raw = np.array([values for _, values in used], np.float64)  # a copy
            finite = np.isfinite(raw)
            if not finite.all():
                raw[~finite] = 0.0
            x = np.abs(raw)
            np.log1p(x, out=x)
            x *= np.sign(raw)  # sign(x) * log1p(|x|), in place
            x *= np.array([w for w, _ in used])[:, None]  # each w * x[k], in one product
            for row in x:
                logit += row
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
        """River's sigmoid (0 below -30, 1 above 30) of each logit, calibrated."""
        # 1 / (1 + exp(-clip(logit, -30, 30))), the same ufuncs in place on one array
        p = np.maximum(logit, -30.0)
        np.minimum(p, 30.0, out=p)
        np.negative(p, out=p)
        np.exp(p, out=p)
        p += 1.0
        np.divide(1.0, p, out=p)
        low, high = logit < -30, logit > 30
        if low.any():
            p[low] = 0.0
        if high.any():
            p[high] = 1.0
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
        for codes, feats in cols.codes() or ():
            if not feats:
                continue
            if user_keys and not user_keys.isdisjoint(chain.from_iterable(feats)):
                return None  # a profile's key is a user feature's
            terms = np.array([self._shared_sum(f) for f in feats] + [0.0])
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
        """``w . x`` over the features ``extra`` expands to (``models.features``); float
        values (most profile features) are summed without building the feature dict."""
        get = self.scorer.weights.get
        s = 0.0
        part: Features = {}
        for key, value in extra.items():
            if type(value) is float:  # add_feature's float case: the name is the key
                w = get(key)
                if w is None:
                    continue
                if value == 0.0:  # add_feature's value of a zero: the zero itself
                    s += w * value
                elif _isfinite(value):
                    s += w * (_log1p(value) if value >= 0.0 else -_log1p(-value))
            elif value is not None:  # add_feature makes nothing of None
                add_feature(part, key, value)
        if not part:  # s is never -0.0 (it starts at +0.0), so s + 0 would be s
            return s
        return s + sum(w * v for name, v in part.items() if (w := get(name)) is not None)

    def _attr_term(self, attrs: dict[str, Any] | None) -> tuple[float, tuple[str, ...]]:
        """(``_sum``, keys) of the ``i:<attr>`` features of catalog attributes
        (``static_item_features`` without a table), kept by the attributes' content:
        names, types and values in dict order, so 1, 1.0 and True are apart and the sum
        adds in the same order; attributes with an unhashable value are summed each time.
        The key is one flat tuple (n names, n types, n values), not a tuple of n triples:
        a collection untracks it at once, not one level per collection."""
        key = None
        if attrs:
            try:
                key = (*attrs, *map(type, attrs.values()), *attrs.values())
                hit = self._attr_memo.get(key)
            except TypeError:  # a list value: no memo
                key = hit = None
            if hit is not None:
                return hit
        extra = static_item_features("", None, attrs)
        found = (self._sum(extra) if extra else 0.0, tuple(extra))  # untracked: str atoms
        if key is not None:
            if len(self._attr_memo) >= MAX_ATTR_MEMO:
                self._attr_memo.clear()
            self._attr_memo[key] = found
        return found

    def _shared_sum(self, extra: dict[str, Any]) -> float:
        """``_sum``, memoised for the ``FixedFeatures`` objects every request shares (a
        cross profile's empty outputs)."""
        if type(extra) is not FixedFeatures:
            return self._sum(extra)
        hit = self._fixed.get(id(extra))
        if hit is None or hit[0] is not extra:
            if len(self._fixed) >= 64:
                self._fixed.clear()
            hit = self._fixed[id(extra)] = (extra, self._sum(extra))
        return hit[1]


class _TableTerms:
    """One ``ColumnScorer``'s item-profile terms of every item of one ``ItemTable``: the
    table's feature matrix (``ItemTable.feature_matrix``) through ``signed_log`` times the
    weights, in one product per (ranker, table version)."""

    def __init__(self, scorer: ColumnScorer, table: ItemTable) -> None:
        self.index, names, matrix = table.feature_matrix()
        self.names = frozenset(names)
        self.exact = "i:category" in self.names
        """A profile feature named like the catalog's category: only the dict is exact."""
        weights = scorer.scorer.weights
        used = [k for k, name in enumerate(names) if name in weights]
        prof = np.zeros(len(self.index) + 1)  # the last row: items without a profile
        if used:
            x = matrix[:, used]
            x = np.where(np.isfinite(x), x, 0.0)
            x = np.sign(x) * np.log1p(np.abs(x))
            prof[:-1] = x @ np.array([weights[names[k]] for k in used])
        self.prof = prof


class _StaticRows:
    """One ``ColumnScorer``'s static item terms per slot of an ``ItemRows``, as three
    parts: ``item=<id>`` (once per slot), the catalog attributes' ``i:<attr>`` terms
    (again when the row's attributes object changes; it is kept, so its ``id`` cannot
    be reused meanwhile) and the table's terms, item profile and ``i:category`` (again
    when the shard's table generation changes: read from the table's ``_TableTerms``
    and the category code ``ItemRows.fill`` keeps, with no per-item feature dicts).
    The sum is River's in another order (within 1e-9); an attribute that overrides an
    item-profile name is summed through ``ColumnScorer._static_term`` (exact dicts)."""

    def __init__(self, scorer: ColumnScorer) -> None:
        self.scorer = scorer
        self.item_w = np.zeros(0)
        self.table_term = np.zeros(0)
        self.attr_term = np.zeros(0)
        self.total = np.zeros(0)
        """``item_w + table_term + attr_term`` of each slot (that sum, kept as they change)."""
        self.gen = np.zeros(0, np.int64)
        self.attr_id = np.zeros(0, np.int64)
        self.over_cat = np.zeros(0, bool)
        """The attributes give ``i:category`` (the table's category does not count)."""
        self.attrs = np.zeros(0, object)
        self.attr_keys = np.zeros(0, object)
        """The ``i:<attr>`` keys of each slot's attributes (a tuple of names)."""
        self.cat_w = np.zeros(1)
        """``i:category=<name>`` weight per category code of the ``ItemRows`` (0: none)."""
        self.keys: set[str] = set()
        """Every static feature key summed (checked against the user's keys)."""
        self.attr_union: set[str] = set()
        """Every ``i:<attr>`` key any slot had (a table whose profile names avoid them all
        needs no slot's exact sum)."""

    def _grow(self, size: int) -> None:
        old = self.item_w.size
        if old >= size:
            return

        def grown(arr: np.ndarray, fill: Any) -> np.ndarray:
            return np.concatenate([arr, np.full(size - old, fill, arr.dtype)])

        self.item_w = grown(self.item_w, np.nan)  # NaN: not computed yet
        self.table_term = grown(self.table_term, 0.0)
        self.attr_term = grown(self.attr_term, 0.0)
        self.total = grown(self.total, np.nan)
        self.gen = grown(self.gen, -1)
        self.attr_id = grown(self.attr_id, 0)
        self.over_cat = grown(self.over_cat, False)
        self.attrs = grown(self.attrs, None)
        self.attr_keys = grown(self.attr_keys, None)

    def _table_terms(self, table: ItemTable) -> _TableTerms:
        key = (self.scorer, _TableTerms)
        terms = table.memo.get(key)
        if terms is None:
            terms = table.memo[key] = _TableTerms(self.scorer, table)
        self.keys.update(terms.names)
        self.keys.add("i:category")
        return terms

    def _category_weights(self, space: ItemRows) -> np.ndarray:
        n = len(space.categories)
        if self.cat_w.size < n:
            get = self.scorer.scorer.weights.get
            self.cat_w = np.concatenate([self.cat_w, [get(f"i:category={c}", 0.0)
                                                      for c in space.categories[self.cat_w.size:]]])
        return self.cat_w

    def terms(self, space: ItemRows, slots: np.ndarray, cols: ItemColumns) -> np.ndarray:
        self._grow(space.capacity)
        attr_ids = space.attr_ids(slots, cols.attrs)
        new_attrs = (self.attr_id[slots] != attr_ids).nonzero()[0]
        if new_attrs.size:
            self._attr_terms(slots, new_attrs, attr_ids, cols)
        gen = space.shard_gen[space.shard[slots]]
        stale = (self.gen[slots] != gen).nonzero()[0]
        if stale.size:
            self._table_rows(space, slots, stale, cols)
            self.gen[slots[stale]] = gen[stale]
            changed = slots[stale]  # every slot of new_attrs is stale too (gen -1)
            self.total[changed] = (self.item_w[changed] + self.table_term[changed]
                                   + self.attr_term[changed])
        return self.total[slots]

    def _attr_terms(self, slots: np.ndarray, new: np.ndarray, attr_ids: np.ndarray,
                    cols: ItemColumns) -> None:
        """``item=<id>`` (first sight) and the attributes' terms of the slots ``new``;
        their table terms are read again (the attributes may override the category)."""
        get = self.scorer.scorer.weights.get
        rows = slots[new]
        fresh = np.isnan(self.item_w[rows])
        if fresh.any():
            self.item_w[rows[fresh]] = [get(f"item={cols.item_ids[j]}", 0.0)
                                        for j in new[fresh].tolist()]
        attr_term = self.scorer._attr_term
        terms: list[float] = []
        over: list[bool] = []
        for j, r in zip(new.tolist(), rows.tolist(), strict=True):
            attrs = cols.attrs[j]
            term, keys = attr_term(attrs)
            self.keys.update(keys)
            self.attr_union.update(keys)
            terms.append(term)
            self.attrs[r] = attrs  # one by one: numpy would unpack tuples
            self.attr_keys[r] = keys
            over.append("i:category" in keys)
        self.attr_term[rows] = terms
        self.over_cat[rows] = over
        self.attr_id[rows] = attr_ids[new]
        self.gen[rows] = -1

    def _table_rows(self, space: ItemRows, slots: np.ndarray, stale: np.ndarray,
                    cols: ItemColumns) -> None:
        """The table terms (item profile + ``i:category``) of the slots ``stale``."""
        rows = slots[stale]
        cat = self._category_weights(space)[space.category[rows]]
        cat[self.over_cat[rows]] = 0.0
        prof = np.zeros(rows.size)
        items, tables = cols.item_ids, cols.tables
        stale_at = stale.tolist()
        shard = space.shard[rows]
        assert cols.rows is not None
        feat = space.feature_rows(rows, cols.rows[stale])  # the tables' profile rows
        union = getattr(self, "attr_union", None)  # None: made before it (check each slot)
        for k in set(shard.tolist()):  # a few shards: one table each (``table_list``)
            at = (shard == k).nonzero()[0].tolist()
            table = tables[stale_at[at[0]]]
            if table is None:
                continue
            terms = self._table_terms(table)  # its index is the table's feature_matrix's
            prof[at] = terms.prof[feat[at]]
            if not terms.exact and union is not None and terms.names.isdisjoint(union):
                continue  # no slot's attributes name a profile feature of this table
            for n in at:
                keys = self.attr_keys[rows[n]]
                if terms.exact or (keys and not terms.names.isdisjoint(keys)):
                    j = stale_at[n]
                    exact = self.scorer._static_term(items[j], table, cols.attrs[j])[0]
                    r = rows[n]
                    prof[n] = exact - self.item_w[r] - self.attr_term[r]
                    cat[n] = 0.0
        self.table_term[rows] = prof + cat


_COLUMN_SCORERS: weakref.WeakKeyDictionary[LinearScorer, ColumnScorer] = weakref.WeakKeyDictionary()


def column_scorer(scorer: LinearScorer) -> ColumnScorer:
    """The one ``ColumnScorer`` of a ``LinearScorer`` in this process (its memos shared)."""
    with _SCORERS_LOCK:
        found = _COLUMN_SCORERS.get(scorer)
        if found is None:
            found = _COLUMN_SCORERS[scorer] = ColumnScorer(scorer)
        return found
