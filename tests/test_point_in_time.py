"""PointInTime: the user's own history with an item is a feature (``ui.*``), the same in
the per-item dicts and in the columns the vectorised scorer reads."""

from __future__ import annotations

import random

import numpy as np

from operators.point_in_time import (
    CovisQuery,
    PointInTime,
    UserContext,
    liked_recency,
    member_mask,
    user_item_columns,
)
from state.user_history import UserHistory

T0 = 1_767_225_600_000


def test_user_item_history_features() -> None:
    history, liked = UserHistory(), UserHistory()
    history.add("u1", "seen", T0 - 2_000)
    history.add("u1", "loved", T0 - 1_000)
    liked.add("u1", "loved", T0 - 1_000)
    context = PointInTime(history=history, liked=liked)
    ctx = context.user("u1", T0)
    items = ["seen", "loved", "new"]
    feats = context.item_features(ctx, items, T0)
    assert [(f.get("ui.interacted", 0.0), f.get("ui.liked", 0.0)) for f in feats] == [
        (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)]  # the newest positive: decay**0
    cols = context.item_columns(ctx, items, T0)
    assert cols.numeric["ui.interacted"].tolist() == [1.0, 1.0, 0.0]
    assert cols.numeric["ui.liked"].tolist() == [0.0, 1.0, 0.0]
    # A user with no history with any of the items: no column at all (absent = 0).
    other = context.user("u2", T0)
    assert "ui.interacted" not in context.item_columns(other, items, T0).numeric
    assert all("ui.interacted" not in f for f in context.item_features(other, items, T0))


def test_after_a_change_of_taste_the_new_positives_outrank_the_old() -> None:
    """Forgetting by count: ``ui.liked`` fades as the user makes new positives, so a
    ranker's positive weight on it puts the new taste's items above the old taste's
    within a few positives (binary ``ui.liked`` kept them tied for good)."""
    history, liked = UserHistory(), UserHistory()
    old = [f"old{n}" for n in range(10)]
    new = [f"new{n}" for n in range(3)]
    for n, item in enumerate(old + new):  # ten positives of the old taste, then three new
        history.add("u1", item, T0 + n * 1_000)
        liked.add("u1", item, T0 + n * 1_000)
    context = PointInTime(history=history, liked=liked, covis=CovisQuery(decay=0.8))
    items = old + new
    cols = context.item_columns(context.user("u1", T0 + 60_000), items, T0 + 60_000)
    value = dict(zip(items, cols.numeric["ui.liked"].tolist(), strict=True))
    assert min(value[i] for i in new) > max(value[i] for i in old)
    # Ranked by the feature (what a positive ranker weight does): the new taste first.
    ranked = sorted(items, key=lambda i: -value[i])
    assert ranked[:3] == ["new2", "new1", "new0"]
    # Still a positive: every recent positive keeps a value above a never-liked item's 0.
    assert min(value.values()) > 0.0
    assert value["new2"] == 1.0 and abs(value["new1"] - 0.8) < 1e-12
    # The dict path (impressions) gives the same values.
    feats = context.item_features(context.user("u1", T0 + 60_000), items, T0 + 60_000)
    assert [f["ui.liked"] for f in feats] == cols.numeric["ui.liked"].tolist()


def test_cross_profiles_without_a_profile_share_one_fixed_object() -> None:
    """A user x category value the user has no profile for answers the store's empty
    outputs as one shared ``FixedFeatures`` (no query, no copy); a value with a profile,
    also one only in the store's write buffer, answers its own fresh query; both equal
    ``store.query``; the vectorised ranker's cross term of the shared object is
    memoised and equals the per-dict sum."""
    from operators.linear_scorer import ColumnScorer, LinearScorer
    from operators.point_in_time import FixedFeatures
    from state.feature_spec import default_features
    from state.profiles import stores_for

    stores = stores_for(default_features(), batch_size=1_000_000)
    cross = stores["user_x_category"]
    cross.apply({"type": "feedback", "action": "click", "user_id": "u1", "item_id": "a",
                 "ts": T0 - 5_000}, lambda item: {"category": "drama"})
    assert cross.stats()["buffered_writes"] > 0  # only in the write buffer so far
    context = PointInTime(profiles=stores)
    query = PointInTime._cross_query
    known = query("u1", cross, "drama", T0)
    assert type(known) is dict and known == cross.query(("u1", "drama"))
    assert known["user_x_category.clicks.1h"] == 1.0
    empty = query("u1", cross, "comedy", T0)
    assert type(empty) is FixedFeatures and empty == cross.query(("u1", "comedy"))
    assert query("u2", cross, "drama", T0) is empty  # one object for every such query
    both = PointInTime._cross_queries("u1", cross, ["drama", "comedy"], T0)  # one store call
    assert both == [known, empty] and type(both[0]) is dict and both[1] is empty
    assert context.cross_attrs() == ("category",)
    # With derived rate outputs, the shared answer holds them too, as a query gives.
    from state.feature_spec import DEFAULT_FEATURES, RATE_FEATURES, parse_features
    rated = stores_for(parse_features([*DEFAULT_FEATURES, *RATE_FEATURES]))["user_x_category"]
    answer = query("u1", rated, "drama", T0)
    assert type(answer) is FixedFeatures and answer == rated.query(("u1", "drama"))
    assert any(name not in empty for name in answer)  # the rate outputs
    # The ranker's term of a shared object is memoised by identity: the per-dict sum.
    scorer = object.__new__(LinearScorer)
    scorer.weights = {"a": 0.5, "b": 2.0, "c=x": -1.5, "d": 0.25}
    scorer.intercept, scorer.rate, scorer.n_learned = 0.0, 1.0, 0
    columns = ColumnScorer(scorer)
    fixed = FixedFeatures({"a": 2.0, "b": None, "c": "x", "d": 3})
    term = columns._shared_sum(fixed)
    assert term == columns._sum(dict(fixed)) and term != 0.0
    assert columns._shared_sum(fixed) == term and len(columns._fixed) == 1
    other = FixedFeatures({"a": 1.0})
    assert columns._shared_sum(other) == columns._sum({"a": 1.0}) != term


def test_user_item_columns_equal_the_per_item_values_on_a_seeded_case() -> None:
    """``user_item_columns`` (membership as bytes, the liked ones set) gives each
    candidate ``1.0`` / ``0.0`` for consumed and ``liked_recency``'s value (0.0 when not
    liked), float64, liked items consumed or not; None when no candidate is consumed."""
    rng = random.Random(19)
    for _ in range(50):
        items = [f"i{j}" for j in range(rng.randint(1, 300))]
        consumed = {item: 1 for item in rng.sample(items, rng.randint(0, len(items) // 3))}
        liked = rng.sample(items, rng.randint(0, min(len(items), 50)))
        ctx = UserContext("u", [], consumed, None, {}, liked)
        cols = user_item_columns(ctx, items, 0.8)
        if not consumed:
            assert cols is None
            continue
        recency = liked_recency(liked, 0.8)
        assert cols is not None
        assert cols["ui.interacted"].dtype == cols["ui.liked"].dtype == np.float64
        assert cols["ui.interacted"].tolist() == [1.0 if i in consumed else 0.0 for i in items]
        assert cols["ui.liked"].tolist() == [recency.get(i, 0.0) for i in items]
    ctx = UserContext("u", [], {"x": 1}, None, {}, ["a"])
    assert user_item_columns(ctx, ["a", "b"], 0.8) is None


def test_member_mask_is_each_items_membership() -> None:
    """``member_mask``: one bool per item, whether the container holds it (a set, a
    dict's keys), for no items too."""
    items = ["a", "b", "c", "a"]
    for container in ({"a", "c"}, {"b": 0}, set(), ()):
        mask = member_mask(container, items)
        assert mask.dtype == np.bool_
        assert mask.tolist() == [i in container for i in items]
    assert member_mask({"a"}, []).tolist() == []


def test_cross_values_of_one_profile_are_one_shared_list_per_value() -> None:
    """When one user x attribute profile matches, ``_cross`` gives the items of one
    attribute value (per request group's cache) one shared list (a deferred token holds
    it for minutes: one tracked list per value, not per impression); when two match, a
    fresh list of both stores' values in order. Either holds what ``_cross_query``
    answers."""
    from state.feature_spec import default_features
    from state.profiles import stores_for

    stores = stores_for(default_features(), batch_size=1_000_000)
    cross = stores["user_x_category"]
    cross.apply({"type": "feedback", "action": "click", "user_id": "u1", "item_id": "a",
                 "ts": T0 - 5_000}, lambda item: {"category": "drama"})
    query = PointInTime._cross_query
    context = PointInTime(profiles=stores)
    cache: dict = {}
    drama = context._cross("u1", cache, {"category": "drama"}, T0)
    assert drama == [query("u1", cross, "drama", T0)]
    assert drama[0]["user_x_category.clicks.1h"] == 1.0
    assert context._cross("u1", cache, {"category": "drama", "size": 2}, T0) is drama
    comedy = context._cross("u1", cache, {"category": "comedy"}, T0)
    assert comedy == [query("u1", cross, "comedy", T0)] and comedy is not drama
    assert context._cross("u1", cache, {"size": 2}, T0) == []
    assert context._cross("u1", cache, None, T0) == []
    two = PointInTime(profiles={**stores, "user_x_brand": cross})
    assert two.cross_attrs() == ("category", "brand")
    cache = {}
    both = two._cross("u1", cache, {"category": "drama", "brand": "comedy"}, T0)
    assert both == [query("u1", cross, "drama", T0), query("u1", cross, "comedy", T0)]
    assert two._cross("u1", cache, {"category": "drama", "brand": "comedy"}, T0) is not both
    brand = two._cross("u1", cache, {"brand": "drama"}, T0)
    assert brand == [drama[0]]
    assert two._cross("u1", cache, {"brand": "drama", "size": 2}, T0) is brand  # one matches
    # the cached one-dict lists are never extended by a row of several
    assert cache[("category", "drama")] == [both[0]] and cache[("brand", "comedy")] == [both[1]]
