"""The online joiner (state/join_state.py): exact outputs on small logs, every correctness edge."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import Feedback, Impression
from state.join_state import HistoryContext, JoinConfig, Joiner, column_of, popularity_draws
from state.sampling import NegativeSampler
from state.user_history import UserHistory

T0 = 1_767_225_600_000
MIN = 60_000


class Context(HistoryContext):
    """The shard's side of the joiner: optional feature function, a history it updates."""

    def __init__(self, features=None) -> None:
        super().__init__(UserHistory())
        self.features = features

    def example_features(self, user_id: str, item_id: str, ts_ms: int) -> dict:
        return self.features(user_id, item_id, ts_ms) if self.features else {}


def make(rate: float = 1.0, features=None, **overrides) -> Joiner:
    config = JoinConfig(window_ms={"click": 10 * MIN, "like": 30 * MIN}, wait_ms_override=0,
                        positive={"click": 0.0, "like": 0.0, "rating": 4.0},
                        allowed_lateness_ms=MIN, **overrides)
    return Joiner(config, NegativeSampler(rate), Context(features))


def feed(joiner: Joiner, f: Feedback) -> None:
    """Join feedback, then record it in the history, as the user shard does."""
    joiner.on_feedback(f)
    joiner.context.history.add(f.user_id, f.item_id, f.ts)


def imp(iid: str, ts: int, user: str = "u1", item: str = "a", pos: int = 0) -> Impression:
    return Impression(ts, iid, user, item, "r1", pos, {"device": "web"})


def fb(iid: str | None, ts: int, action: str = "click", user: str = "u1", item: str = "a",
       value: float = 1.0) -> Feedback:
    return Feedback(ts, user, item, action, iid, value, {})


def run(joiner: Joiner, events: list, advance_each: bool = True) -> tuple[list, list]:
    for e in events:
        if isinstance(e, Impression):
            joiner.on_impression(e)
        else:
            feed(joiner, e)
        if advance_each:
            joiner.advance()
    return joiner.drain()


def test_positive_emitted_at_once_negative_when_window_closes() -> None:
    j = make()
    examples, late = run(j, [imp("i1", T0), imp("i2", T0, item="b", pos=1), fb("i1", T0 + 5_000)])
    assert examples == [{
        "example_id": "imp:i1", "ts": T0, "user_id": "u1", "item_id": "a", "label": 1,
        "labels": {"click": 1.0}, "weight": 1.0, "position": 0, "request_id": "r1",
        "impression_id": "i1", "context": {"device": "web"}, "features": {}, "source": "impression",
    }]
    # i2 waits for the longest positive window (30 min) plus the lateness (1 min).
    j.observe(T0 + 31 * MIN - 1)
    j.advance()
    assert j.drain() == ([], [])
    j.observe(T0 + 31 * MIN)
    j.advance()
    examples, late = j.drain()
    assert [(e["example_id"], e["label"], e["weight"]) for e in examples] == [("imp:i2", 0, 1.0)]
    assert late == []


def test_several_actions_one_example_and_rule_after_emission() -> None:
    j = make()
    examples, late = run(j, [imp("i1", T0), fb("i1", T0 + 1000, "dwell", value=3.0),
                             fb("i1", T0 + 2000, "click"), fb("i1", T0 + 3000, "like")])
    assert len(examples) == 1
    assert examples[0]["labels"] == {"dwell": 3.0, "click": 1.0}
    assert [(x["reason"], x["action"], x["example_id"]) for x in late] == [
        ("after_emission", "like", "imp:i1")]
    j.flush()
    assert j.drain() == ([], [])


def test_duplicates_are_idempotent() -> None:
    j = make()
    examples, _ = run(j, [imp("i1", T0), imp("i1", T0), fb("i1", T0 + 1), fb("i1", T0 + 2)])
    j.flush()
    more, late = j.drain()
    assert len(examples) + len(more) == 1 and late == []
    assert j.counters.dup_impressions == 1 and j.counters.dup_feedback == 1
    # A replayed impression after its window closed is still recognised.
    run(j, [imp("i1", T0)])
    j.flush()
    assert j.drain() == ([], []) and j.counters.dup_impressions == 2


def test_feedback_before_its_impression_within_lateness() -> None:
    j = make()
    examples, late = run(j, [fb("i1", T0 + 2000), imp("i1", T0)])
    assert [(e["example_id"], e["label"]) for e in examples] == [("imp:i1", 1)]
    assert late == []


def test_orphan_feedback_without_impression_becomes_late_label() -> None:
    j = make()
    run(j, [fb("ghost", T0)])
    j.observe(T0 + 2 * MIN)
    j.advance()
    examples, late = j.drain()
    assert examples == [] and [(x["reason"], x["impression_id"]) for x in late] == [
        ("no_impression", "ghost")]


def test_feedback_later_than_window_is_a_late_label_not_counted() -> None:
    j = make()
    run(j, [imp("i1", T0)])
    j.observe(T0 + 40 * MIN)
    j.advance()
    examples, _ = j.drain()
    assert [(e["example_id"], e["label"]) for e in examples] == [("imp:i1", 0)]
    examples, late = run(j, [fb("i1", T0 + 40 * MIN)])
    assert examples == []
    assert [(x["reason"], x["example_id"]) for x in late] == [("after_window", "imp:i1")]


def test_click_outside_its_own_window_while_waiting_for_likes() -> None:
    j = make()
    examples, late = run(j, [imp("i1", T0), fb("i1", T0 + 15 * MIN, "click")])
    assert examples == [] and [x["reason"] for x in late] == ["outside_window"]
    examples, late = run(j, [fb("i1", T0 + 20 * MIN, "like")])
    assert [(e["label"], e["labels"]) for e in examples] == [(1, {"like": 1.0})]


def test_interaction_positive_with_popularity_negatives() -> None:
    j = make(interaction_negatives=2)
    for n, item in enumerate(["p1", "p1", "p2", "p3", "p4"]):
        feed(j, fb(None, T0 + n, user=f"other{n}", item=item))
    j.drain()
    feed(j, fb(None, T0 + 100, "rating", user="u1", item="p2", value=2.0))  # consumed, negative
    feed(j, fb(None, T0 + 200, "rating", user="u1", item="x", value=5.0))
    examples, _ = j.drain()
    assert [(e["source"], e["item_id"], e["label"]) for e in examples[:2]] == [
        ("interaction", "p2", 0), ("interaction", "x", 1)]
    sampled = examples[2:]
    assert len(sampled) == 2
    assert all(e["source"] == "sampled" and e["label"] == 0 and e["weight"] == 1.0 for e in sampled)
    assert {e["item_id"] for e in sampled} <= {"p1", "p3", "p4"}  # never consumed p2, never x
    assert len({e["example_id"] for e in sampled}) == 2
    # Deterministic: the same log gives the same sampled negatives.
    j2 = make(interaction_negatives=2)
    for n, item in enumerate(["p1", "p1", "p2", "p3", "p4"]):
        feed(j2, fb(None, T0 + n, user=f"other{n}", item=item))
    feed(j2, fb(None, T0 + 100, "rating", user="u1", item="p2", value=2.0))
    feed(j2, fb(None, T0 + 200, "rating", user="u1", item="x", value=5.0))
    assert j2.drain()[0][-len(examples):] == examples


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63 - 1), st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=400),
       st.integers(1, 64))
def test_popularity_draws_are_numpys_weighted_choice(seed: int, logs: list[float], size: int
                                                     ) -> None:
    """The sampled negatives' draws are ``Generator.choice(p=...)``'s, and the generator is
    left in the same state (a replay samples the same negatives as before)."""
    scores = np.exp(np.asarray(logs) - max(logs))
    probs = scores / scores.sum()
    ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
    assert popularity_draws(ours, probs, size) == numpys.choice(
        len(probs), size=size, replace=True, p=probs).tolist()
    assert ours.random() == numpys.random()


def test_declared_organic_signals_are_weighted_positives() -> None:
    j = make(interaction_negatives=2, organic={"view": 0.3})
    for n, item in enumerate(["p1", "p2", "p3"]):
        feed(j, fb(None, T0 + n, user=f"other{n}", item=item))
    j.drain()
    feed(j, fb(None, T0 + 100, "view", item="x"))
    feed(j, fb(None, T0 + 200, "wishlist", item="y"))  # undeclared: a negative interaction
    examples, _ = j.drain()
    assert [(e["source"], e["item_id"], e["label"], e["weight"]) for e in examples[:3]] == [
        ("interaction", "x", 1, 0.3), ("sampled", examples[1]["item_id"], 0, 0.3),
        ("sampled", examples[2]["item_id"], 0, 0.3)]
    assert [(e["item_id"], e["label"]) for e in examples[3:]] == [("y", 0)]
    assert j.config.is_positive("view", 0.0) and not j.config.is_positive("wishlist", 1.0)
    # Declared nothing: a view is an interaction without a positive label.
    plain = make(organic={})
    feed(plain, fb(None, T0, "view", item="x"))
    assert [(e["item_id"], e["label"]) for e in plain.drain()[0]] == [("x", 0)]


def test_end_of_input_flushes_every_window() -> None:
    j = make()
    run(j, [imp(f"i{n}", T0 + n) for n in range(5)] + [fb("zz", T0)])
    j.flush()
    examples, late = j.drain()
    assert sorted(e["example_id"] for e in examples) == [f"imp:i{n}" for n in range(5)]
    assert [x["reason"] for x in late] == ["no_impression"]
    assert not j.pending and not j.orphans


def test_pending_state_is_bounded_oldest_first() -> None:
    j = make(max_pending=3)
    examples, _ = run(j, [imp(f"i{n}", T0 + n) for n in range(5)], advance_each=False)
    assert [e["example_id"] for e in examples] == ["imp:i0", "imp:i1"]
    assert j.counters.forced_closes == 2 and len(j.pending) == 3


def test_windows_sharing_a_deadline_close_in_id_order() -> None:
    """A request's impressions share one deadline: they close in impression-id order,
    also when the pending bound closes only some of them."""
    ids = ["k", "b", "x", "a", "m"]
    j = make()
    run(j, [imp(i, T0) for i in ids] + [imp("late", T0 + 1)], advance_each=False)
    j.flush()
    assert [e["example_id"] for e in j.drain()[0]] == [f"imp:{i}" for i in [*sorted(ids), "late"]]
    j = make(max_pending=3)
    examples, _ = run(j, [imp(i, T0) for i in ids], advance_each=False)
    assert [e["example_id"] for e in examples] == ["imp:a", "imp:b"]  # the 4th closed "a"
    examples, _ = run(j, [imp("y", T0 - 1)], advance_each=False)  # older: closes first
    assert [e["example_id"] for e in examples] == ["imp:y"]
    j.flush()
    assert [e["example_id"] for e in j.drain()[0]] == ["imp:k", "imp:m", "imp:x"]


def mixed_log(n: int) -> list:
    """Impressions of several users and items over 90 minutes, with clicks, likes,
    duplicates, feedback before its impression and feedback after the window."""
    events: list = []
    for k in range(n):
        ts = T0 + k * 20_000
        iid = f"k{k}"
        user, item = f"u{k % 3}", f"i{k % 5}"
        if k % 11 == 3:  # feedback before its impression (an orphan for a while)
            events.append(fb(iid, ts - 5_000, "click", user, item))
        events.append(imp(iid, ts, user, item, k % 4))
        if k % 7 == 0:
            events.append(imp(iid, ts + 1, user, item))  # a duplicate
        if k % 5 == 1:
            events.append(fb(iid, ts + 30_000, "like", user, item))
        if k % 5 == 2:
            events.append(fb(f"k{k - 1}", ts + 40_000, "click", f"u{(k - 1) % 3}",
                             f"i{(k - 1) % 5}"))  # clicks the liked one: after emission
        if k % 13 == 4 and k >= 100:  # k - 100 was shown 33 minutes ago: after its window
            events.append(fb(f"k{k - 100}", ts, "click", f"u{(k - 100) % 3}", f"i{(k - 100) % 5}"))
    return events


@pytest.mark.parametrize("cut", [40, 130, 200])
def test_recovered_joiner_resumes_exactly(cut: int) -> None:
    """A joiner pickled mid-stream (pending rows with labels, emitted positives, rows
    released and reused, orphans waiting) and restored writes exactly what the
    uninterrupted one writes from there on (the columnar recovery format)."""
    import pickle

    log = mixed_log(200)
    j = make(rate=0.5)
    before = run(j, log[:cut])
    resumed = pickle.loads(pickle.dumps(j))
    assert resumed.pending_count() == j.pending_count() > 0
    assert dict(resumed.pending.items()) == dict(j.pending.items())
    outputs = []
    for joiner in (j, resumed):
        after = run(joiner, log[cut:])
        joiner.flush()
        outputs.append((after, joiner.drain(), joiner.counters))
    assert outputs[0] == outputs[1]
    assert before[0] and outputs[0][0][0] and outputs[0][0][1]  # examples and late labels


def test_released_rows_are_reused_without_their_old_values() -> None:
    """Closed windows free their rows; a new impression in a reused row starts with no
    labels and its own features (nothing of the row's previous impression)."""
    j = make(features=lambda user, item, ts: {"f": float(len(item))})
    run(j, [imp("a1", T0, item="aa"), fb("a1", T0 + 1_000, "like", item="aa"),
            imp("a2", T0, item="b")])
    rows = len(j._pending.impression)
    run(j, [imp("b1", T0 + 40 * MIN, item="ccc")])  # a1, a2 closed: rows freed
    assert len(j._pending.impression) == rows and j.pending_count() == 1
    entry = j.pending["b1"]
    assert entry.labels == {} and entry.features == {"f": 3.0} and not entry.emitted
    j.flush()
    [example] = j.drain()[0]
    assert example["labels"] == {} and example["features"] == {"f": 3.0}


def test_negative_downsampling_deterministic_and_weighted() -> None:
    j = make(rate=0.25)
    events = [imp(f"i{n}", T0 + n) for n in range(4000)] + [fb("i7", T0 + 10)]
    examples, _ = run(j, events, advance_each=False)
    j.flush()
    examples += j.drain()[0]
    negatives = [e for e in examples if e["label"] == 0]
    assert [e["example_id"] for e in examples if e["label"] == 1] == ["imp:i7"]
    assert all(e["weight"] == 4.0 for e in negatives)
    assert abs(sum(e["weight"] for e in negatives) - 3999) / 3999 < 0.1
    j2 = make(rate=0.25)
    again, _ = run(j2, events, advance_each=False)
    j2.flush()
    assert again + j2.drain()[0] == examples
    kept = {e["example_id"][4:] for e in negatives}
    sampler = NegativeSampler(0.25)  # the impression's decision is keep("imp:<id>")'s
    assert kept == {f"i{n}" for n in range(4000) if n != 7 and sampler.keep(f"imp:i{n}")}


@pytest.mark.parametrize(("rate", "seed"), [(0.1, 0), (0.5, 3), (1.0, 0)])
def test_keep_impression_is_keep_of_its_example_id(rate: float, seed: int) -> None:
    sampler = NegativeSampler(rate, seed)
    ids = [f"imp{n}-{n % 7}" for n in range(20_000)]
    assert [sampler.keep_impression(i) for i in ids] == [sampler.keep(f"imp:{i}") for i in ids]
    assert sampler.keep_impressions(ids) == [sampler.keep(f"imp:{i}") for i in ids]  # batched


def test_features_taken_at_impression_time() -> None:
    calls: list[tuple[str, str, int]] = []

    def features(user: str, item: str, ts: int) -> dict:
        calls.append((user, item, ts))
        return {"seen_calls": len(calls)}

    j = make(features=features)
    examples, _ = run(j, [fb("i1", T0 + 10), imp("i1", T0), fb("i1", T0 + 20, "like")])
    assert calls == [("u1", "a", T0)]
    assert examples[0]["features"] == {"seen_calls": 1}


def _log() -> list:
    events: list = []
    for n in range(12):
        ts = T0 + n * 7_000
        events.append(imp(f"i{n}", ts, user=f"u{n % 3}", item=f"it{n % 5}"))
        if n % 3 == 0:
            events.append(fb(f"i{n}", ts + 4_000, user=f"u{n % 3}", item=f"it{n % 5}"))
        if n % 4 == 1:
            events.append(fb(None, ts + 1_000, "rating", user=f"u{n % 3}", item=f"x{n}", value=5.0))
    return sorted(events, key=lambda e: e.ts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, MIN - 1), min_size=40, max_size=40))
def test_reordering_within_lateness_yields_same_examples(jitters: list[int]) -> None:
    """Any arrival order in which no event is more than the lateness behind the max ts seen."""
    log = _log()
    shuffled = [e for _, e in sorted(zip([e.ts + j for e, j in zip(log, jitters, strict=False)], log,
                                         strict=True), key=lambda p: p[0])]

    def examples_of(events: list) -> set:
        j = make(interaction_negatives=0)
        out, _ = run(j, events)
        j.flush()
        out += j.drain()[0]
        return {(e["example_id"], e["user_id"], e["item_id"], e["label"], e["weight"]) for e in out}

    assert examples_of(shuffled) == examples_of(log)


def test_a_resumed_joiner_labels_each_impression_alone() -> None:
    """Pending impressions share one empty labels dict until their first feedback, and a
    pickled joiner (recovery) restores them sharing one copy: feedback on one impression
    never labels another."""
    import pickle

    j = make()
    j.on_impression(imp("m1", T0, "u1", "a"))
    j.on_impression(imp("m2", T0, "u1", "b"))
    resumed = pickle.loads(pickle.dumps(j))
    for joiner in (j, resumed):
        feed(joiner, fb("m1", T0 + MIN, "like", "u1", "a"))
        joiner.flush()
        examples = {e["example_id"]: e["labels"] for e in joiner.drain()[0]}
        assert examples == {"imp:m1": {"like": 1.0}, "imp:m2": {}}


def test_closed_ids_forget_as_an_ordered_dict() -> None:
    """``ClosedIds`` (a dict and an insertion-order queue) holds and forgets exactly what
    the ``OrderedDict`` it replaced did: random adds (one and many, ids repeated) and
    forgets with horizons and limits."""
    import random
    from collections import OrderedDict

    from state.pending import ClosedIds

    rng = random.Random(7)
    for _ in range(50):
        model: OrderedDict[str, int] = OrderedDict()
        closed = ClosedIds()
        t = 0
        for _ in range(200):
            step = rng.random()
            if step < 0.3:
                iid, t = f"i{rng.randrange(60)}", t + rng.randrange(5)
                model[iid] = t
                closed.add(iid, t)
            elif step < 0.7:
                ids = [f"i{rng.randrange(60)}" for _ in range(rng.randrange(1, 6))]
                times = [t + rng.randrange(5) for _ in ids]
                for iid, when in zip(ids, times, strict=True):
                    model[iid] = when
                closed.add_many(ids, times)
                t += 2
            else:
                horizon, limit = t - rng.randrange(20), rng.randrange(5, 40)
                while model:
                    iid = next(iter(model))
                    if model[iid] > horizon and len(model) <= limit:
                        break
                    del model[iid]
                closed.forget(horizon, limit)
            assert closed.at == model and list(closed.order) == list(model)


def test_a_joiner_state_of_the_previous_version_resumes() -> None:
    """Recovery state written before joiner5 (closed ids in an ``OrderedDict``, no example
    counts) loads: the closed ids keep deduplicating and expire as before."""
    import pickle
    from collections import OrderedDict

    from state.pending import ClosedIds

    j = make()
    j.on_impression(imp("m1", T0))
    j.flush()
    state = j.__getstate__()
    state["closed_ids"] = OrderedDict(state["closed_ids"].at)  # the previous layout
    del state["by_label"]
    old = object.__new__(Joiner)
    old.__setstate__(state)
    resumed = pickle.loads(pickle.dumps(old))
    assert isinstance(resumed.closed_ids, ClosedIds) and "m1" in resumed.closed_ids
    resumed.on_impression(imp("m1", T0 + 1))
    assert resumed.counters.dup_impressions == 1 and resumed.drain_counts() == {}


class _EveryStep(Joiner):
    """The joiner whose clock step calls each part of ``advance`` unconditionally (as it
    did before the checks were inlined): the slow path the fast one must equal."""

    def advance(self) -> None:
        watermark = self.watermark_ms
        if watermark is None:
            return
        self._close_until(watermark)
        self._expire_orphans(watermark)
        self.closed_ids.forget(watermark - self.config.dedup_horizon_ms,
                               4 * self.config.max_pending)


@pytest.mark.parametrize("seed", range(6))
def test_advance_equals_calling_every_part_at_every_step(seed: int) -> None:
    """Random streams (repeated ids, orphans, late and interaction feedback, forced closes,
    ids seen again after a short dedup horizon or beyond the closed-id bound): the joiner
    whose clock step checks what is due first gives the same examples, late labels,
    counters, closed ids and pending ids as one that calls every part at every step."""
    import random

    rng = random.Random(seed)
    config = {"dedup_horizon_ms": rng.choice([3 * MIN, 40 * MIN]),
              "max_pending": rng.choice([4, 50]), "max_orphans": 5}
    fast, slow = make(**config), make(**config)
    slow.__class__ = _EveryStep
    t = T0
    for step in range(600):
        t += rng.randrange(0, 40_000)
        if rng.random() < 0.6:
            events: list = [imp(f"m{rng.randrange(120)}", t, f"u{rng.randrange(4)}",
                                f"i{rng.randrange(6)}")]
        else:
            iid = rng.choice([None, f"m{rng.randrange(130)}"])
            events = [fb(iid, t - rng.randrange(0, 90_000), rng.choice(["click", "like", "view"]),
                         f"u{rng.randrange(4)}", f"i{rng.randrange(6)}")]
        got = [run(joiner, events, advance_each=step % 3 == 0) for joiner in (fast, slow)]
        assert got[0] == got[1]
        assert fast.counters == slow.counters
        assert fast.closed_ids.at == slow.closed_ids.at
        assert list(fast.closed_ids.order) == list(slow.closed_ids.order)
        assert list(fast.pending) == list(slow.pending) and fast.orphans == slow.orphans
    fast.flush()
    slow.flush()
    assert fast.drain() == slow.drain() and fast.counters == slow.counters


@pytest.mark.parametrize("weight", [1.0, 10.0, 0.3, 1 / 3, 1e300, 2.0 ** 52, -3.0])
def test_counts_add_weights_as_one_at_a_time(weight: float) -> None:
    """``by_label``'s weight sums equal adding each example's weight in turn, whatever the
    weight (integer weights are added at once only where every partial sum is exact)."""
    j = make()
    expected = 0.0
    for n in (1, 7, 1000, 3):
        j._count(0, weight, n)
        for _ in range(n):
            expected += weight
        assert j.by_label["0"] == [j.by_label["0"][0], expected]
    assert j.by_label["0"][0] == 1011


def test_column_of_gathers_rows_in_order() -> None:
    column = [f"v{n}" for n in range(10)]
    for rows in ([], [3], [7, 2], [9, 0, 9, 4], list(range(10))[::-1]):
        assert column_of(column, rows) == [column[row] for row in rows]
        assert type(column_of(column, rows)) is list


def test_pending_extend_gives_the_rows_and_columns_of_one_add_each() -> None:
    """``PendingColumns.extend`` (a run taken when no row is free) leaves the same rows,
    columns and free list as ``add`` of each impression in order."""
    from state.pending import NO_LABELS, PendingColumns

    def columns(c: PendingColumns) -> tuple:
        return (dict(c.rows), c.impression, c.deadline, c.labels, c.features, c.flags, c.free)

    imps = [imp(f"m{j}", T0) for j in range(5)]
    one, many = PendingColumns(), PendingColumns()
    for c in (one, many):
        c.add(imp("m-first", T0 - 1), T0 + 9, "x", 0)  # rows taken before the run
    for j, i in enumerate(imps):
        one.add(i, T0 + 10, ("tok", j), j % 3)
    many.extend(imps, [i.impression_id for i in imps], T0 + 10, [("tok", j) for j in range(5)],
                [j % 3 for j in range(5)])
    assert columns(many) == columns(one)
    assert list(many.rows) == ["m-first", "m0", "m1", "m2", "m3", "m4"]
    assert many.labels[1:] == [NO_LABELS] * 5 and many.deadline[1:] == [T0 + 10] * 5


def test_prefixed_hashes_are_the_hashes_of_the_prefixed_ids() -> None:
    """``stable_hashes64(ids, prefix)`` is ``stable_hash64(prefix + id)`` of each (the
    sampler's keep decisions: ``keep_impressions`` = ``keep_impression`` of each)."""
    from state.hashing import stable_hash64, stable_hashes64

    ids = ["m1", "imp0-17", "é-ü", "x" * 300]
    assert stable_hashes64(ids, "0:imp:") == [stable_hash64("0:imp:" + i) for i in ids]
    for key in [*ids, "0:imp:m1", "", 42]:  # the BLAKE2b digest of the UTF-8 bytes, as ever
        assert stable_hash64(key) == int.from_bytes(hashlib.blake2b(
            str(key).encode(), digest_size=8).digest(), "little")
    assert stable_hash64("u1") == 0xd56a4e3f684d9992  # (pinned: shard routing, sampling)
    assert stable_hashes64(ids) == [stable_hash64(i) for i in ids]
    sampler = NegativeSampler(0.3, 5)
    many = [f"m{j}" for j in range(200)]
    keeps = sampler.keep_impressions(many)
    assert keeps == [sampler.keep_impression(i) for i in many] and 20 < sum(keeps) < 100
