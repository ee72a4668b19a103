"""Impression-time features paid only where used (issue 18 point 4).

A real ``UserShard`` with real snapshots (the ``World`` of test_serving): impressions
whose negative the sampler will drop keep what their features need and compute them
only if clicked, with exactly the values they had at impression time; the user
context is taken once per request.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_world import DAY, ITEMS, SEED, T0, TypeSpy, World, feed, warm_up

from events.model import Event, Feedback, Impression, Item, Request
from models.mf import UserFactors
from operators.point_in_time import PointInTime
from operators.user_shard import UserShard
from state.sampling import NegativeSampler

RATE = 0.3


def stream(n_requests: int = 30, users: tuple[str, ...] = ("u1", "u2", "u3")) -> list[Event]:
    """Requests of 10 impressions each; every third impression is clicked a minute later,
    with state changes in between (the user's other clicks, catalog updates)."""
    events: list[Event] = []
    clicks: list[Feedback] = []
    for r in range(n_requests):
        ts = T0 + r * 20_000
        user = users[r % len(users)]
        events.append(Request(ts, f"r{r}", user))
        for p in range(10):
            item = ITEMS[(r * 7 + p * 3) % len(ITEMS)]
            events.append(Impression(ts + 20, f"imp{r}-{p}", user, item, f"r{r}", p, {}))
            if (r + p) % 3 == 0:
                clicks.append(Feedback(ts + 60_000 + p, user, item, "click", f"imp{r}-{p}"))
        if r % 5 == 4:
            events.append(Item(ts + 30, ITEMS[r % len(ITEMS)], {"category": "c9", "price": 1.0 * r}))
        due = [c for c in clicks if c.ts <= ts + 10_000]
        clicks = [c for c in clicks if c.ts > ts + 10_000]
        events.extend(due)
    events.extend(clicks)
    events.sort(key=lambda e: e.ts)
    return events


def shard_pair(world: World) -> tuple[UserShard, UserShard]:
    """(deferring shard, eager shard): the same wiring, the second always computes."""
    lazy, eager = world.user_shard(), world.user_shard()
    for shard in (lazy, eager):
        shard.joiner.sampler = NegativeSampler(RATE, 0)
    eager.joiner._defer = None
    return lazy, eager


def run(shard: UserShard, events: list[Event], batch: int = 37) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    warm_up(shard)
    for i in range(0, len(events), batch):
        out.extend(feed(shard, events[i:i + batch]).get("examples", []))
    out.extend(shard.flush().get("examples", []))
    return out


@pytest.fixture
def published(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.publish_all()
    return world


def test_deferred_features_equal_the_ones_computed_at_impression_time(published: World) -> None:
    events = stream()
    lazy, eager = shard_pair(published)
    got, want = run(lazy, events), run(eager, events)
    assert got == want
    sampler = NegativeSampler(RATE, 0)
    deferred_positives = [e for e in got if e["label"] == 1 and e["source"] == "impression"
                          and not sampler.keep(e["example_id"])]
    assert deferred_positives, "the stream must click impressions whose negative was dropped"
    assert all(e["features"].get("i:category") for e in deferred_positives)
    assert any("covis" in e["features"] and "mf" in e["features"] for e in deferred_positives)


def test_deferred_features_survive_new_snapshots_and_recovery(published: World) -> None:
    """Between an impression and its click the item tables are republished and the shard
    is pickled and restored: the example still has the impression-time features."""
    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        warm_up(shard)
    sampler = NegativeSampler(RATE, 0)
    imp_id = next(f"x{n}" for n in range(100) if not sampler.keep(f"imp:x{n}"))
    imp = Impression(T0, imp_id, "u", "a31", "rx", 0, {})
    setup = [Feedback(T0 - 10_000, "u", SEED, "click"), Request(T0 - 20, "rx", "u")]
    for shard in (lazy, eager):
        feed(shard, [*setup, imp])
    published.popular["a31"] = 1e6  # a later table: different popularity, new covis rows
    published.publish_tables(ts=T0 + 1_000)
    for shard in (lazy, eager):  # both now serve the new tables
        feed(shard, [Request(T0 + 1_500, "rz", "someone-else")])
    assert {t.ts for t in lazy.views.loaded_tables()} == {T0 + 1_000}
    spy = TypeSpy(io.BytesIO())
    spy.dump(lazy)
    assert not {"ItemTable", "ItemIndex", "Index", "FrozenViews"} & spy.types
    lazy = pickle.loads(pickle.dumps(lazy))
    later = [Request(T0 + 2_000, "ry", "u"), Feedback(T0 + 5_000, "u", "a31", "click", imp_id)]
    [got] = [e for e in feed(lazy, later)["examples"] if e["example_id"] == f"imp:{imp_id}"]
    [want] = [e for e in feed(eager, later)["examples"] if e["example_id"] == f"imp:{imp_id}"]
    assert got == want
    assert got["features"]["pop"] < 1e5


def test_dropped_impressions_compute_no_item_features(published: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = PointInTime._token_columns  # the joiner's item columns (serving's: item_columns)

    def counting(self: PointInTime, ctx: Any, item_ids: list[str], *args: Any) -> Any:
        calls.extend(item_ids)
        return original(self, ctx, item_ids, *args)

    monkeypatch.setattr(PointInTime, "_token_columns", counting)
    lazy, _ = shard_pair(published)
    examples = run(lazy, stream())
    impressions = [e for e in examples if e["source"] == "impression"]
    counters = lazy.joiner.counters
    assert counters.negatives_dropped > counters.negatives_kept
    # One computation per emitted impression example, none for dropped negatives.
    assert len(calls) == len(impressions) < counters.impressions


def test_a_users_mf_vector_is_read_once_between_mf_steps(published: World,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's context and its impressions' take one read of the user's MF vector (a
    read-only array) while no MF step runs; after the batch's MF steps the next context
    reads the new vector, bit for bit the table's."""
    shard = published.user_shard()
    warm_up(shard)
    feed(shard, [Feedback(T0 + DAY - 5_000, "u", SEED, "click")])  # an MF step: a row for u
    assert shard.users is not None
    reads: list[str] = []
    original = UserFactors.vector

    def counting(self: UserFactors, user_id: str) -> Any:
        reads.append(user_id)
        return original(self, user_id)

    monkeypatch.setattr(UserFactors, "vector", counting)
    first = shard.context.user("u", T0 + DAY)
    again = shard.context.user("u", T0 + DAY + 20)
    assert reads == ["u"] and first.vector is not None and again.vector is first.vector
    assert not first.vector.flags.writeable
    feed(shard, [Feedback(T0 + DAY + 1_000, "u", ITEMS[1], "click")])  # u's MF step
    later = shard.context.user("u", T0 + DAY + 2_000)
    assert reads == ["u", "u"] and later.vector is not None
    assert np.array_equal(later.vector, original(shard.users, "u"))
    assert not np.array_equal(later.vector, first.vector)


def test_user_context_is_taken_once_per_request(published: World,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shard = published.user_shard()
    warm_up(shard)
    feed(shard, [Feedback(T0 + DAY - 5_000, "u", SEED, "click")])
    calls: list[str] = []
    original = PointInTime.user

    def counting(self: PointInTime, user_id: str, ts_ms: int | None) -> Any:
        calls.append(user_id)
        return original(self, user_id, ts_ms)

    monkeypatch.setattr(PointInTime, "user", counting)
    imps = [Impression(T0 + DAY, f"i{p}", "u", ITEMS[p], "r1", p, {}) for p in range(10)]
    feed(shard, imps[:4])
    feed(shard, imps[4:])  # the request's impressions straddle two micro-batches
    assert calls == ["u"]
    examples = feed(shard, [Feedback(T0 + DAY + 1_000 + p, "u", ITEMS[p], "click", f"i{p}")
                            for p in range(10)])["examples"]
    assert len(examples) == 10
    seen = {e["features"].get("user.impressions.5m", 0.0) for e in examples}
    assert seen == {0.0}, "siblings of one request are not earlier impressions"
    # A later request of the same user sees the first one's impressions.
    later = feed(shard, [Impression(T0 + DAY + 60_000, "j0", "u", ITEMS[20], "r2", 0, {}),
                         Feedback(T0 + DAY + 61_000, "u", ITEMS[20], "click", "j0")])
    assert calls == ["u", "u"]
    assert later["examples"][0]["features"]["user.impressions.5m"] == 10.0


def test_new_snapshots_keep_dropped_impressions_deferred_up_to_a_bound(
        published: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """At new snapshot versions no pending impression is computed: each keeps the
    version it read (its features are needed only when its example is written: a click,
    or the sampler's keep at the close) until ``RETAINED_VERSIONS`` newer versions
    replaced it, then it is detached from it (what it reads captured, not computed) and
    the old version freed. The click's example and the kept negative's are the eager
    shard's either way."""
    import gc
    import weakref

    from operators import point_in_time

    monkeypatch.setattr(point_in_time, "RETAINED_VERSIONS", 8)  # the default keeps none
    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        warm_up(shard)
    sampler = NegativeSampler(RATE, 0)
    dropped = next(f"x{n}" for n in range(100) if not sampler.keep(f"imp:x{n}"))
    kept = next(f"x{n}" for n in range(100) if sampler.keep(f"imp:x{n}"))
    for shard in (lazy, eager):
        feed(shard, [Request(T0 - 20, "rx", "u"), Impression(T0, dropped, "u", "a31", "rx", 0, {}),
                     Impression(T0, kept, "u", "a32", "rx", 1, {})])
    pending = lazy.joiner.pending
    assert type(pending[dropped].features) is not dict  # deferred
    old = [weakref.ref(t) for t in lazy.views.loaded_tables()]
    others = [f"y{n}" for n in range(300) if not sampler.keep(f"imp:y{n}")]
    for n in range(point_in_time.RETAINED_VERSIONS + 1):
        published.publish_tables(ts=T0 + 1_000 + n)
        for shard in (lazy, eager):  # each version read by a pending impression
            feed(shard, [Request(T0 + 1_500 + n, f"rz{n}", "v"),
                         Impression(T0 + 1_500 + n, others[n], "v", "a33", f"rz{n}", 0, {})])
        assert type(pending[kept].features) is tuple  # computed when written (the close)
        if n < point_in_time.RETAINED_VERSIONS:
            assert type(pending[dropped].features) is not dict, n  # still deferred
            assert all(ref() is not None for ref in old)
    token = pending[dropped].features
    assert type(token) is tuple and token[0].views is None  # past the bound: detached
    assert token[0].detached is not None
    gc.collect()
    assert all(ref() is None for ref in old), "an old table version is still referenced"
    later = [Feedback(T0 + 5_000, "u", "a31", "click", dropped)]
    [got] = [e for e in feed(lazy, later)["examples"] if e["example_id"] == f"imp:{dropped}"]
    [want] = [e for e in feed(eager, later)["examples"] if e["example_id"] == f"imp:{dropped}"]
    assert got == want
    [got] = [e for e in lazy.flush()["examples"] if e["example_id"] == f"imp:{kept}"]
    [want] = [e for e in eager.flush()["examples"] if e["example_id"] == f"imp:{kept}"]
    assert got == want


def test_new_snapshots_detach_dropped_impressions_without_computing_them(
        published: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default (no replaced version retained) new snapshots detach the dropped
    and kept impressions from the version they read: it is freed at once, their
    features are not computed, and the clicked ones, a seen item (``ui.*``) among them,
    and the kept negative at the close get the eager shard's examples, MF and
    co-visitation included."""
    import gc
    import weakref

    computed: list[str] = []
    summed: list[str] = []
    original = PointInTime._token_columns
    lookup = PointInTime._covis_lookup

    def spy(self: PointInTime, ctx: Any, item_ids: list[str], *args: Any) -> Any:
        computed.extend(item_ids)  # the joiner's full computation (a detach makes none)
        return original(self, ctx, item_ids, *args)

    def spy_sums(self: PointInTime, seeds: list[str], name: str, item_ids: list[str],
                 *args: Any, **kw: Any) -> Any:
        summed.extend(item_ids)
        return lookup(self, seeds, name, item_ids, *args, **kw)

    monkeypatch.setattr(PointInTime, "_token_columns", spy)
    monkeypatch.setattr(PointInTime, "_covis_lookup", spy_sums)
    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        warm_up(shard)
    sampler = NegativeSampler(RATE, 0)
    dropped = [f"x{n}" for n in range(100) if not sampler.keep(f"imp:x{n}")][:4]
    kept = next(f"x{n}" for n in range(100) if sampler.keep(f"imp:x{n}"))
    items = ["a31", "a32", SEED, "a33"]  # SEED: the user clicked it before (ui.*)
    events: list[Event] = [Feedback(T0 - 10_000, "u", SEED, "click"), Request(T0 - 20, "rx", "u")]
    events += [Impression(T0, iid, "u", item, "rx", p, {})
               for p, (iid, item) in enumerate(zip(dropped, items, strict=True))]
    events.append(Impression(T0, kept, "u", "a34", "rx", 4, {}))
    for shard in (lazy, eager):
        feed(shard, events)
    pending = lazy.joiner.pending
    old = [weakref.ref(t) for t in lazy.views.loaded_tables()]
    published.popular["a31"] = 1e6
    published.publish_tables(ts=T0 + 1_000)
    computed.clear()
    summed.clear()
    for shard in (lazy, eager):
        feed(shard, [Request(T0 + 1_500, "rz", "v")])
    assert computed == [], "the version's columns are captured once, not computed per token"
    assert summed == [], "the seeds' rows are captured, no group's co-visitation summed"
    for iid in [*dropped, kept]:
        token = pending[iid].features
        assert type(token) is tuple and token[0].views is None and token[0].detached is not None
    gc.collect()
    assert all(ref() is None for ref in old), "an old table version is still referenced"
    later = [Feedback(T0 + 5_000 + p, "u", item, "click", iid)
             for p, (iid, item) in enumerate(zip(dropped, items, strict=True))]
    got = {e["example_id"]: e for e in feed(lazy, later)["examples"]}
    want = {e["example_id"]: e for e in feed(eager, later)["examples"]}
    assert len(got) == len(dropped) and got == want
    assert set(summed) >= set(items), "summed from the capture when written"
    features = [e["features"] for e in got.values()]
    assert any("ui.interacted" in f for f in features)
    assert all("mf" in f for f in features) and any("covis" in f for f in features)
    assert max(f["pop"] for f in features) < 1e5, "the impression-time version's values"
    [got_kept] = [e for e in lazy.flush()["examples"] if e["example_id"] == f"imp:{kept}"]
    [want_kept] = [e for e in eager.flush()["examples"] if e["example_id"] == f"imp:{kept}"]
    assert got_kept == want_kept


def test_deferred_features_taken_together_at_new_snapshots_equal_impression_time(
        published: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """New item tables mid-stream: every pending impression whose negative the sampler
    keeps is computed at once (``PointInTime.resolve_all``: one ``_token_columns`` call
    per request), the others when clicked, and every example is what the eager shard
    computed at impression time, MF and co-visitation included."""
    sizes: list[int] = []
    original = PointInTime._token_columns

    def spy(self: PointInTime, ctx: Any, item_ids: list[str], ts: int, views: Any,
            *args: Any) -> Any:
        if views is not None:  # deferred features read their frozen views
            sizes.append(len(item_ids))
        return original(self, ctx, item_ids, ts, views, *args)

    monkeypatch.setattr(PointInTime, "_token_columns", spy)
    events = stream(n_requests=40)
    half = len(events) // 2
    lazy, eager = shard_pair(published)
    got: list[dict[str, Any]] = []
    want: list[dict[str, Any]] = []
    for shard in (lazy, eager):
        warm_up(shard)
    for shard, out in ((lazy, got), (eager, want)):
        for i in range(0, half, 37):
            out.extend(feed(shard, events[i:min(i + 37, half)]).get("examples", []))
    pending = sum(type(e.features) is not dict for e in lazy.joiner.pending.values())
    assert pending > 20
    published.popular[ITEMS[3]] = 1e6
    published.publish_tables(ts=events[half].ts - 1)
    for shard, out in ((lazy, got), (eager, want)):
        for i in range(half, len(events), 37):
            out.extend(feed(shard, events[i:i + 37]).get("examples", []))
        out.extend(shard.flush().get("examples", []))
    assert got == want
    assert max(sizes) >= 3, "the kept impressions of one request are computed together"
    sampler = NegativeSampler(RATE, 0)
    early = {e.impression_id for e in events[:half] if isinstance(e, Impression)}
    batched = [e for e in got if e["label"] == 1 and e["impression_id"] in early
               and not sampler.keep(e["example_id"])]
    assert batched and any("mf" in e["features"] and "covis" in e["features"] for e in batched)


def test_later_interactions_do_not_leak_into_deferred_features(published: World) -> None:
    """The user views the item after the impression and before the click: the example
    still has the impression-time ``ui.*`` features (none: the item was new to them)."""
    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        warm_up(shard)
    events = [Feedback(T0 - 10_000, "u", SEED, "click"), Request(T0 - 20, "rx", "u"),
              Impression(T0, "x1", "u", "a31", "rx", 0, {}),
              Feedback(T0 + 1_000, "u", "a31", "view"),
              Feedback(T0 + 5_000, "u", "a31", "click", "x1")]
    [got] = [e for e in feed(lazy, events)["examples"] if e["example_id"] == "imp:x1"]
    [want] = [e for e in feed(eager, events)["examples"] if e["example_id"] == "imp:x1"]
    assert "ui.interacted" not in want["features"]
    assert got == want


def test_windows_closing_together_compute_their_features_together(
        published: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """At r = 1 every negative is written: the impressions of a request share a deadline,
    close in the same step and are computed in one ``_token_columns`` call (not one per
    impression), with the values the eager shard computed at impression time; a click
    before the close is computed alone, at once."""
    sizes: list[int] = []
    original = PointInTime._token_columns  # the joiner's item columns

    def counting(self: PointInTime, ctx: Any, item_ids: list[str], *args: Any) -> Any:
        sizes.append(len(item_ids))
        return original(self, ctx, item_ids, *args)

    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        shard.joiner.sampler = NegativeSampler(1.0, 0)
        warm_up(shard)
    events: list[Event] = [Feedback(T0 - 10_000, "u1", SEED, "click")]
    for r in range(6):
        ts = T0 + r * 20_000
        events.append(Request(ts, f"r{r}", f"u{r % 2 + 1}"))
        events.extend(Impression(ts + 20, f"imp{r}-{p}", f"u{r % 2 + 1}",
                                 ITEMS[(r * 7 + p * 3) % len(ITEMS)], f"r{r}", p, {})
                      for p in range(10))
    events.append(Feedback(T0 + 30_000, "u1", ITEMS[0], "click", "imp0-0"))
    events.append(Request(T0 + DAY, "late", "someone-else"))  # every window has closed
    want = [e for batch in (feed(eager, events[i:i + 13]) for i in range(0, len(events), 13))
            for e in batch.get("examples", []) if e["source"] == "impression"]
    monkeypatch.setattr(PointInTime, "_token_columns", counting)
    got = [e for batch in (feed(lazy, events[i:i + 13]) for i in range(0, len(events), 13))
           for e in batch.get("examples", []) if e["source"] == "impression"]
    assert got == want and len(got) == 60
    # the organic click, the click on imp0-0 at once, then one call per request
    assert sorted(sizes) == [1, 1, 9, 10, 10, 10, 10, 10]


def batched_and_per_item(world: World, rate: float | None = None
                         ) -> tuple[UserShard, UserShard, list[int]]:
    """(shard taking several items' features in one call, shard falling back to one
    ``example_features`` call per item, the first one's ``_token_columns`` calls)."""
    together, alone = world.user_shard(), world.user_shard()
    if rate is not None:
        for shard in (together, alone):
            shard.joiner.sampler = NegativeSampler(rate, 0)
    alone.joiner.context.features_run = None  # the joiner falls back per item
    calls: list[int] = []
    context = together.joiner.context
    token_columns = context._token_columns
    context._token_columns = lambda *a: calls.append(1) or token_columns(*a)
    return together, alone, calls


def test_sampled_negatives_taken_together_equal_one_at_a_time(published: World) -> None:
    """An organic positive's sampled negatives get their features in one call
    (``PointInTime.features_run``): the same examples, bit for bit, as one
    ``example_features`` call per negative."""
    together, alone, calls = batched_and_per_item(published)
    events: list[Event] = [Feedback(T0 - 50_000, "u7", SEED, "click")]
    for n in range(40):
        events.append(Feedback(T0 + n * 30_000, f"u{n % 4}", ITEMS[(n * 11) % len(ITEMS)],
                               "click" if n % 3 else "like"))
    got = [run(shard, events) for shard in (together, alone)]
    assert got[0] == got[1]
    sampled = [e for e in got[0] if e["source"] == "sampled"]
    assert len(sampled) >= 40
    assert any("mf" in e["features"] and "pop" in e["features"] for e in sampled)
    assert any("covis" in e["features"] for e in sampled)
    interactions = sum(e["source"] == "interaction" for e in got[0])
    assert len(calls) <= 2 * interactions < len(sampled), "one call per negative"


def test_an_interaction_and_its_sampled_negatives_take_one_features_call(published: World) -> None:
    """A positive organic interaction and its sampled negatives share one
    ``_token_columns`` call (its user context and co-visitation seeds read once); a
    negative interaction the sampler drops takes none. The examples equal those of one
    ``example_features`` call per item, bit for bit."""
    together, alone, calls = batched_and_per_item(published, RATE)
    events: list[Event] = [Feedback(T0 - 50_000, "u7", SEED, "click")]
    for n in range(60):  # positives (click, like) and negatives (skip) of four users
        action = ("click", "like", "skip")[n % 3]
        events.append(Feedback(T0 + n * 30_000, f"u{n % 4}", ITEMS[(n * 11) % len(ITEMS)], action))
    got = [run(shard, events) for shard in (together, alone)]
    assert got[0] == got[1]
    interactions = sum(e["source"] == "interaction" for e in got[0])
    assert sum(e["source"] == "sampled" for e in got[0]) >= 40
    stats = together.joiner.counters
    assert stats.negatives_dropped > 0 and stats.negatives_kept > 0
    assert len(calls) == interactions, "one call per interaction example, none when dropped"


def test_a_user_without_an_mf_row_folds_its_seeds_once_per_state(published: World) -> None:
    """A user with history but no MF row gets the mean of its recent items' vectors:
    computed once while its seeds and the index version stay the same (a request and
    the rating after it), again when either changes; always the same bits as the mean."""
    shard = published.user_shard()
    warm_up(shard)
    context = shard.context
    assert context.users is not None and context.users.vector("fresh") is None
    for n, item in enumerate(ITEMS[:5]):
        context.history.add("fresh", item, T0 - 10_000 + n)
    calls = []
    item_vectors = context.item_vectors
    context.item_vectors = lambda items: calls.append(list(items)) or item_vectors(items)
    first = context.user("fresh", T0).vector
    again = context.user("fresh", T0 + 1).vector
    assert len(calls) == 1 and again is first
    want = item_vectors(context.history.recent("fresh", 20)).mean(axis=0)
    assert first is not None and first.tobytes() == want.tobytes()
    assert not first.flags.writeable  # shared: nobody may change it in place
    context.history.add("fresh", ITEMS[6], T0 + 2)
    moved = context.user("fresh", T0 + 3).vector
    assert len(calls) == 2 and moved is not None and moved.tobytes() != first.tobytes()
    published.publish_index(T0)  # a new index version: read again
    context.views.poll(T0 + 10)
    context.user("fresh", T0 + 11)
    assert len(calls) == 3


def test_groups_tracked_for_a_switch_stay_bounded_while_the_snapshots_stay(
        published: World) -> None:
    """Without a new snapshot version the weak list of groups taken on the current one
    (what a switch detaches) keeps at most about twice the groups still pending."""
    lazy, _ = shard_pair(published)
    warm_up(lazy)
    for r in range(3_000):  # one impression per request, each window closed at once
        feed(lazy, [Request(T0 + r * 10, f"q{r}", "u"),
                    Impression(T0 + r * 10 + 1, f"q{r}-0", "u", ITEMS[r % len(ITEMS)], f"q{r}", 0, {})])
        lazy.joiner.flush()
    assert 0 < len(lazy.context._open) <= 2_048


def test_the_negative_pool_is_listed_once_per_index_version(published: World) -> None:
    """BPR negatives are drawn from the index snapshot's items: listed once per frozen
    index version for every user shard of the process (the same list while it stays),
    again when a new version is polled."""
    shard = published.user_shard()
    warm_up(shard)
    context = shard.context
    assert context.views is not None
    if context.views.index.index is None:
        published.publish_index(T0 - 1)
        context.views.poll(T0)
    assert context.views.index.index is not None
    first = context.negative_pool()
    assert first == context.views.index.index.item_ids() and first
    assert context.negative_pool() is first
    published.vectors["new-item"] = next(iter(published.vectors.values())) + 1.0
    published.publish_index(T0)  # a new index version, one item more: listed again
    context.views.poll(T0 + 10)
    moved = context.negative_pool()
    assert moved is not first and moved == context.views.index.index.item_ids()
    assert "new-item" in moved and "new-item" not in first
    other = published.user_shard()  # another shard of the process: the same version's list
    other.context.views.poll(T0 + 10)
    assert other.context.views.index.index is context.views.index.index
    assert other.context.negative_pool() is moved


def test_groups_detached_from_one_version_share_each_items_static_features(
        published: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests (two groups) showing the same item, detached from one version: when
    both are clicked the item's static features are made once for the version, not
    once per group, and both examples are the eager shard's."""
    from operators import point_in_time

    made: list[Any] = []
    original = point_in_time.static_features_of

    def spy(capture: Any, attrs: Any) -> Any:
        made.append(capture)
        return original(capture, attrs)

    lazy, eager = shard_pair(published)
    for shard in (lazy, eager):
        warm_up(shard)
    sampler = NegativeSampler(RATE, 0)
    dropped = [f"x{n}" for n in range(100) if not sampler.keep(f"imp:x{n}")][:2]
    events: list[Event] = []
    for r, (user, iid) in enumerate(zip(("u", "v"), dropped, strict=True)):
        events += [Request(T0 + r, f"r{r}", user), Impression(T0 + r, iid, user, "a31", f"r{r}", 0, {})]
    for shard in (lazy, eager):
        feed(shard, events)
    published.publish_tables(ts=T0 + 1_000)
    for shard in (lazy, eager):
        feed(shard, [Request(T0 + 1_500, "rz", "w")])
    tokens = [lazy.joiner.pending[iid].features for iid in dropped]
    assert all(type(t) is tuple and t[0].detached is not None for t in tokens)
    assert tokens[0][0] is not tokens[1][0], "two groups"
    monkeypatch.setattr(point_in_time, "static_features_of", spy)
    clicks = [Feedback(T0 + 5_000 + r, user, "a31", "click", iid)
              for r, (user, iid) in enumerate(zip(("u", "v"), dropped, strict=True))]
    got = {e["example_id"]: e for e in feed(lazy, clicks)["examples"]}
    assert len(made) == 1, "made once for the version"
    monkeypatch.setattr(point_in_time, "static_features_of", original)
    want = {e["example_id"]: e for e in feed(eager, clicks)["examples"]}
    assert len(got) == 2 and got == want
