"""The serving fast paths give exactly what the straightforward code gives.

* ``LinearScorer`` (River LR scored as one shared partial sum plus each candidate's own
  terms) equals River's ``predict_proba_one`` / ``Ranker.predict_many`` bit for bit;
* ``shared_features`` / ``item_part`` / ``join_features`` rebuild ``ranking_features_many``
  (and that still equals ``ranking_features`` per item);
* ``ItemTable.top`` and the merged top lists of ``Server.retrieve`` equal a stable sort of
  every table's items (ties included);
* ``SnapshotViews.table_map`` follows newly loaded tables.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import Request
from models.calibration import correct_downsampled
from models.features import (
    add_feature,
    item_part,
    join_features,
    ranking_features,
    ranking_features_many,
    shared_features,
)
from models.ranker_io import save_ranker
from models.rankers import Ranker, make_ranker
from operators.linear_scorer import LinearScorer, linear_scorer
from operators.point_in_time import PointInTime, UserContext
from operators.serving import Candidate, Server, ServingConfig
from operators.snapshot_views import SnapshotViews
from state.covisitation import CoVisConfig, CoVisitation
from state.item_table import CatalogEntry, ItemTable
from state.snapshot_store import SnapshotStore

T0 = 1_767_225_600_000


# -------------------------------------------------------------------------------------
# Features: the split used by the fast path rebuilds the same dicts, in the same order
# -------------------------------------------------------------------------------------

_keys = st.sampled_from(["a", "b", "pop", "u:age", "i:category", "covis", "mf", "x=1", "tags",
                         "user.clicks.1h"])
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from(["1", "y", "z"]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.lists(st.sampled_from(["p", "q", "1"]), max_size=4),
)
_extras = st.dictionaries(_keys, _values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(user_extra=st.one_of(st.none(), _extras), item_extras=st.lists(_extras, min_size=1, max_size=5),
       context=st.dictionaries(st.sampled_from(["device", "x"]), _values, max_size=2),
       position=st.sampled_from([None, -1, 0, 3, 99]))
def test_split_features_rebuild_ranking_features_many(
        user_extra: dict[str, Any] | None, item_extras: list[dict[str, Any]],
        context: dict[str, Any], position: int | None) -> None:
    items = [f"i{n}" for n in range(len(item_extras))]
    many = ranking_features_many("u1", items, T0 + 123, context, position, user_extra, item_extras)
    shared = shared_features("u1", T0 + 123, context, position, user_extra)
    for item, extra, feats in zip(items, item_extras, many, strict=True):
        merged = {**(user_extra or {}), **extra}
        assert feats == ranking_features("u1", item, T0 + 123, context, position, merged)
        joined = join_features(shared, user_extra, item, extra)
        assert list(joined.items()) == list(feats.items())  # same keys, values and order
        part = item_part(shared, user_extra, item, extra)
        if part is not None:
            assert list({**shared, **part}.items()) == list(feats.items())
            assert not set(part) & set(shared)
        elif not (user_extra and set(extra) & set(user_extra)):
            naive = {f"item={item}": 1.0}
            for key, value in extra.items():
                add_feature(naive, key, value)
            assert set(naive) & set(shared)  # refused only for a name clash


def test_item_part_refuses_overrides_and_clashes() -> None:
    shared = shared_features("u", T0, {}, 0, {"k": 2.0, "c": "x"})
    assert item_part(shared, {"k": 2.0}, "i", {"k": 3.0}) is None  # overrides a user key
    assert item_part(shared, {"k": 2.0, "c": "x"}, "i", {"c=x": 1.0}) is None  # same name
    assert item_part(shared, {"k": 2.0}, "i", {"m": 1.0}) == {"item=i": 1.0, "m": math.log1p(1.0)}


# -------------------------------------------------------------------------------------
# LinearScorer == River
# -------------------------------------------------------------------------------------


def _trained_lr(rng: random.Random, rate: float | None = 0.1) -> Ranker:
    """A River LR ranker trained on feature dicts like the flow's (ids, time, profile,
    item attributes, numeric aggregates spanning orders of magnitude)."""
    ranker = make_ranker("lr", negative_rate=rate)
    for n in range(600):
        user, item = f"u{rng.randrange(30)}", f"i{rng.randrange(80)}"
        extra = {"u:age": rng.choice(["18-24", "25-34"]), "user.clicks.1h": rng.randrange(20),
                 "user.rating_mean.all": rng.uniform(1, 5), "i:category": f"c{rng.randrange(6)}",
                 "pop": rng.uniform(0, 1e6), "mf": rng.gauss(0, 1), "covis": rng.expovariate(1),
                 "user.recent": [f"i{rng.randrange(80)}" for _ in range(3)]}
        label = int(rng.random() < 0.3 + 0.4 * (item < "i4"))
        ex = {"user_id": user, "item_id": item, "ts": T0 + n * 1000, "position": rng.randrange(5),
              "context": {"device": rng.choice(["ios", "web"])}, "features": extra,
              "label": label, "weight": 1.0 if label or rate is None else 1.0 / rate}
        ranker.learn(ex)
    return ranker.copy()


def _request_extras(rng: random.Random, n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    user_extra = {"u:age": "25-34", "user.clicks.1h": 7, "user.rating_mean.all": 3.7,
                  "user.recent": ["i1", "i7", "i9"], "user.missing": None, "u:flag": True}
    extras = []
    for j in range(n):
        extra: dict[str, Any] = {"i:category": f"c{rng.randrange(7)}", "pop": rng.uniform(0, 1e6),
                                 "trend": rng.choice([0.0, rng.uniform(0, 50)]),
                                 "covis": rng.expovariate(1), "mf": rng.gauss(0, 1),
                                 "i:year": rng.randrange(1950, 2020), "i:tags": ["p", "q", "p"]}
        if j % 7 == 3:
            extra["user.clicks.1h"] = 2.0  # overrides a profile key: full-dict path
        if j % 11 == 5:
            extra["u:age=25-34"] = 1.0  # clashes with a shared name: full-dict path
        if j % 13 == 6:
            extra["pop"] = float("nan")
        extras.append(extra)
    return user_extra, extras


@pytest.mark.parametrize("rate", [0.1, 1.0, None])
def test_linear_scorer_equals_river_bit_for_bit(rate: float | None) -> None:
    rng = random.Random(3)
    ranker = _trained_lr(rng, rate)
    scorer = linear_scorer(ranker)
    assert scorer is not None
    items = [f"i{n}" for n in range(80)] + ["never-seen"]
    user_extra, extras = _request_extras(rng, len(items))
    context = {"device": "web"}
    fast = scorer.predict_many("u3", items, T0 + 7_200_000, context, 0, user_extra, extras)
    feats = ranking_features_many("u3", items, T0 + 7_200_000, context, 0, user_extra, extras)
    assert fast.dtype == np.float64
    assert fast.tolist() == ranker.predict_many(feats).tolist()  # exact, not approx
    # ... and each equals River's own predict_proba_one, corrected for downsampling.
    for x, p in zip(feats, fast.tolist(), strict=True):
        raw = ranker.model.predict_proba_one(x)[True]
        assert p == correct_downsampled(raw, ranker.rate)
    assert len(set(fast.tolist())) > 10  # the model does discriminate


def test_linear_scorer_is_shared_per_snapshot_and_only_for_river_lr() -> None:
    ranker = _trained_lr(random.Random(1))
    assert linear_scorer(ranker) is linear_scorer(ranker)
    assert linear_scorer(ranker.copy()) is not linear_scorer(ranker)  # a new snapshot object
    for kind in ("fm", "efm"):
        assert linear_scorer(make_ranker(kind).copy()) is None  # type: ignore[arg-type]
    assert LinearScorer.supports(ranker)
    assert linear_scorer(ranker.copy(frozen=False)) is None  # a training copy can change


def test_linear_scorer_refuses_itself_when_it_would_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    ranker = _trained_lr(random.Random(2))
    monkeypatch.setattr(LinearScorer, "_dot", lambda self, x, start: start + 1.0)
    assert linear_scorer(ranker) is None


# -------------------------------------------------------------------------------------
# Top lists and retrieval over several tables
# -------------------------------------------------------------------------------------


def _table(shard: str, popular: dict[str, float], trending: dict[str, float]) -> ItemTable:
    catalog = {i: CatalogEntry("c", True, T0 - 1) for i in {**popular, **trending}}
    return ItemTable(shard, T0, CoVisitation(CoVisConfig()), popular, trending, catalog)


def test_item_table_top_is_a_stable_sort_and_cached() -> None:
    rng = random.Random(5)
    popular = {f"i{n}": float(rng.randrange(6)) for n in range(300)}  # many ties
    table = _table("i000", popular, {})
    reference = sorted(popular.items(), key=lambda kv: kv[1], reverse=True)
    assert table.top("popular", 40) == reference[:40]
    assert table.top("popular", 10) == reference[:10]  # from the cache
    assert table.top("popular", 100) == reference[:100]  # grows
    assert table.top("popular", 1000) == reference  # fewer than asked: all
    assert table.top("popular", 5000) == reference
    assert table.top("trending", 5) == []
    with pytest.raises(ValueError):
        table.top("catalog", 3)
    fresh = ItemTable(table.shard, table.ts, table.covis, dict(popular), {}, dict(table.catalog))
    assert table == fresh and "_top" not in repr(table)  # the cache is not part of either


class _Reader:
    def __init__(self, table: ItemTable | None) -> None:
        self.current = table


def _server(tables: list[ItemTable], sources: dict[str, int]) -> Server:
    views = SnapshotViews.__new__(SnapshotViews)
    views.tables = {t.shard: _Reader(t) for t in tables}  # type: ignore[misc]
    views._table_cache = None

    class _NoIndex:
        index = None

    views.index = _NoIndex()  # type: ignore[assignment]
    return Server(ServingConfig(sources=sources),
                  PointInTime(views=views, item_shard_of=lambda item: "i00" + item[1]))


def _reference_retrieve(tables: list[ItemTable], sources: dict[str, int],
                        consumed: int) -> list[tuple[str, list[str], dict[str, float]]]:
    """The pre-optimisation retrieval of trending and popular (sort every table's items)."""
    cands: dict[str, Candidate] = {}
    for source in ("trending", "popular"):
        n = sources.get(source, 0)
        merged: list[tuple[str, float]] = []
        for t in tables:
            merged.extend(getattr(t, source).items())
        merged.sort(key=lambda kv: kv[1], reverse=True)
        for item, score in merged[: n + min(consumed, 2 * n)]:
            c = cands.setdefault(item, Candidate(item))
            c.sources.append(source)
            c.scores[source] = score
    return [(c.item_id, c.sources, c.scores) for c in cands.values()]


@pytest.mark.parametrize("consumed", [0, 3, 17, 1000])
def test_retrieve_top_lists_equal_a_full_stable_sort(consumed: int) -> None:
    rng = random.Random(consumed)
    tables = []
    for s in range(4):
        items = [f"x{s}-{n}" for n in range(200)]
        tables.append(_table(f"i00{s}", {i: float(rng.randrange(8)) for i in items},
                             {i: float(rng.randrange(4)) for i in items if rng.random() < 0.5}))
    sources = {"trending": 7, "popular": 12}
    server = _server(tables, sources)
    ctx = UserContext("u", [], {f"c{n}": 0 for n in range(consumed)}, None, {})
    for _ in range(2):  # second time from the caches
        cands, _ = server.retrieve(ctx, T0)
        got = [(c.item_id, c.sources, c.scores) for c in cands.values()]
        assert got == _reference_retrieve(tables, sources, consumed)


def test_table_map_follows_new_table_versions(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    views = SnapshotViews(store, ["i000", "i001"], poll_ms=0)
    assert views.table_map() == {} and views.loaded_tables() == []
    first = _table("i000", {"a": 1.0}, {})
    store.write("items-i000", "npz", first.save, T0)
    views.poll()
    v1 = views.table_map()
    assert list(v1) == ["i000"] and views.table_map() is v1  # cached
    store.write("items-i001", "npz", _table("i001", {"b": 2.0}, {}).save, T0)
    store.write("items-i000", "npz", _table("i000", {"a": 3.0}, {}).save, T0 + 1)
    views.poll()
    v2 = views.table_map()
    assert v2 is not v1 and list(v2) == ["i000", "i001"]
    assert v2["i000"].popular == {"a": 3.0}
    assert [t.shard for t in views.loaded_tables()] == ["i000", "i001"]


def test_recommend_is_the_same_with_and_without_the_fast_scorer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through Server.recommend (item features from PointInTime)."""
    import operators.serving as serving

    rng = random.Random(11)
    store = SnapshotStore(tmp_path / "snapshots")
    items = [f"i{n}" for n in range(80)]
    for s in ("i000", "i001"):
        mine = [i for i in items if int(i[1:]) % 2 == int(s[-1])]
        covis = CoVisitation(CoVisConfig())
        covis.add([(a, b, rng.uniform(0.1, 3)) for a in mine[:10] for b in items[:30] if a != b], T0)
        table = ItemTable(s, T0, covis, {i: rng.uniform(0, 100) for i in mine},
                          {i: rng.uniform(0, 10) for i in mine[:15]},
                          {i: CatalogEntry(f"c{int(i[1:]) % 5}", True, T0 - 10) for i in mine})
        store.write(f"items-{s}", "npz", table.save, T0)
    ranker = _trained_lr(rng)
    store.write("ranker", "npz", lambda p: save_ranker(ranker, p, frozen=True), T0)
    views = SnapshotViews(store, ["i000", "i001"], poll_ms=0)
    views.poll()
    server = Server(ServingConfig(sources={"covis": 30, "trending": 10, "popular": 20}),
                    PointInTime(views=views, item_shard_of=lambda item: f"i00{int(item[1:]) % 2}"))
    ctx = UserContext("u3", ["i0", "i2", "i4"], {"i0": 1, "i2": 2, "i4": 3}, None,
                      {"u:age": "25-34", "user.clicks.1h": 4})
    req = Request(T0 + 5, "r1", "u3", 10, {"device": "web"})
    fast = server.recommend(req, ctx, 0)
    assert server.views.ranker.current is not None and linear_scorer(server.views.ranker.current)
    monkeypatch.setattr(serving, "linear_scorer", lambda ranker: None)
    slow = server.recommend(req, ctx, 0)
    assert fast["items"] == slow["items"] and len(fast["items"]) == 10


def test_attribute_terms_kept_by_content_equal_the_sums() -> None:
    """``ColumnScorer._attr_term`` keeps the static term of catalog attributes by their
    content: equal dicts (other objects) share it; 1, 1.0 and True, key order and list
    values (not kept) each give the term summed from their own features. What is kept
    holds no container the collector keeps tracking (a key is untracked at the first
    collection, the (sum, names) pair at the second; a set never is)."""
    import gc

    from operators.linear_scorer import ColumnScorer, LinearScorer
    from operators.point_in_time import static_item_features

    scorer = object.__new__(LinearScorer)
    scorer.weights = {"i:category=drama": 0.75, "i:size": 1.5, "i:tags=x": -0.5,
                      "i:brand=b": 0.125}
    scorer.intercept, scorer.rate, scorer.n_learned = 0.0, 1.0, 0
    columns = ColumnScorer(scorer)

    def summed(attrs: dict[str, Any] | None) -> tuple[float, tuple[str, ...]]:
        extra = static_item_features("", None, attrs)
        return (columns._sum(extra) if extra else 0.0), tuple(extra)

    cases = [None, {}, {"category": "drama", "available": True},
             {"category": "drama", "size": 1}, {"category": "drama", "size": 1.0},
             {"category": "drama", "size": True}, {"size": 3.0, "brand": "b"},
             {"brand": "b", "size": 3.0}, {"category": "drama", "tags": ["x", "y"]},
             {"category": "drama", "nested": {"a": 1}}]
    for _ in range(2):  # the second round reads the kept terms
        for attrs in cases:
            copy = None if attrs is None else {k: v for k, v in attrs.items()}
            assert columns._attr_term(copy) == summed(attrs)
    assert columns._attr_term({"category": "drama", "size": 1})[0] != columns._attr_term(
        {"category": "drama", "size": True})[0]
    assert len(columns._attr_memo) == 6  # the hashable non-empty ones
    gc.collect()
    assert not any(gc.is_tracked(key) for key in columns._attr_memo)
    gc.collect()
    assert not any(gc.is_tracked(kept) for kept in columns._attr_memo.values())


def test_column_sum_of_zero_and_none_values_is_the_feature_dicts_sum() -> None:
    """``ColumnScorer._sum`` adds a float zero as its own signed log and skips ``None``
    and unweighted names: bit for bit the float terms of ``add_feature``'s dict in order,
    then the non-float ones (a string, a list), as before the zero path."""
    import math

    from models.features import add_feature
    from operators.linear_scorer import ColumnScorer, LinearScorer

    scorer = object.__new__(LinearScorer)
    names = ["a", "b", "c", "d", "e", "g=x", "h=y", "z"]
    scorer.weights = {n: (-1.0) ** k * (k + 1) / 3.0 for k, n in enumerate(names)}
    scorer.intercept, scorer.rate, scorer.n_learned = 0.0, 1.0, 0
    columns = ColumnScorer(scorer)
    cases = [{"a": 0.0, "b": -0.0, "c": None, "d": 2.5, "e": -7.25, "n": 0.0},
             {"a": 1e-300, "b": 0.0, "g": "x", "h": ["y"], "d": float("nan")},
             {"z": 0.0}, {}]
    for extra in cases:
        s = 0.0
        rest: dict[str, float] = {}
        for key, value in extra.items():
            one: dict[str, float] = {}
            add_feature(one, key, value)
            for name, v in one.items():
                w = scorer.weights.get(name)
                if w is not None and type(value) is float:
                    s += w * v
                elif w is not None:
                    rest[name] = w * v
        want = s + sum(rest.values()) if rest else s
        got = columns._sum(extra)
        assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want)
