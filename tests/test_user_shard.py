"""The user shard (operators/user_shard.py): routing, the order of work per event, typed
item updates, and one failing event turned into a dead letter."""

from __future__ import annotations

from typing import Any

from events.model import Feedback, Impression, Item, Request, User
from operators.item_updates import CatalogChange, Interaction
from operators.user_shard import UserShard, route_events, shard_key
from state.join_state import JoinConfig
from state.sampling import NegativeSampler

T0 = 1_767_225_600_000


def shard(**kwargs: Any) -> UserShard:
    return UserShard(JoinConfig(interaction_negatives=0), NegativeSampler(1.0, 0), **kwargs)


def test_items_go_to_every_shard_and_user_events_to_their_own_in_order() -> None:
    events = [Feedback(T0, "u1", "a", "click"), Item(T0 + 1, "a", {}), User(T0 + 2, "u2", {}),
              Feedback(T0 + 3, "u1", "b", "click")]
    routed = dict(route_events(events, 3, lambda user: int(user[1]), 7))
    assert routed[shard_key(1)] == (shard_key(1), [events[0], events[1], events[3]], 7)
    assert routed[shard_key(2)] == (shard_key(2), [events[1], events[2]], 7)
    assert routed[shard_key(0)] == (shard_key(0), [events[1]], 7)


def test_the_shard_records_history_after_the_join() -> None:
    """The interaction's example is built before the feedback is in the history (its
    features never see the event itself); afterwards the item is consumed."""
    s = shard()
    seen: list[bool] = []
    original = s.context.features_run

    def spy(user_id: str, item_ids: list[str], ts_ms: int) -> list[Any]:
        seen.extend(item in s.history.consumed(user_id) for item in item_ids)
        return original(user_id, item_ids, ts_ms)

    s.joiner.context.features_run = spy  # type: ignore[method-assign]
    out = s.process("u000", [Feedback(T0, "u", "a", "rating", None, 5.0)])
    assert seen == [False] and "a" in s.history.consumed("u")
    assert [e["example_id"][:4] for e in out["examples"]] == ["int:"]


def test_item_updates_are_typed_messages() -> None:
    s = shard()
    out = s.process("u000", [Item(T0, "a", {"category": "c"}),
                             Feedback(T0 + 1, "u", "a", "click"),
                             Feedback(T0 + 2, "u", "b", "rating", None, 1.0)])
    assert out["item-updates"] == [
        CatalogChange("a", Item(T0, "a", {"category": "c"})),
        Interaction("a", T0 + 1, True), Interaction("b", T0 + 2, False)]


def test_an_event_that_fails_becomes_a_dead_letter_and_the_batch_goes_on() -> None:
    s = shard()
    original = s._request

    def failing(req: Request) -> None:
        if req.request_id == "bad":
            raise RuntimeError("boom")
        original(req)

    s._request = failing  # type: ignore[method-assign]
    out = s.process("u000", [Request(T0, "bad", "u", 10),
                             Impression(T0 + 1, "i1", "u", "a", None, 0, {})])
    [dead] = out["dead-letters"]
    assert dead["reason"] == "processing_error" and "RuntimeError: boom" in dead["detail"]
    assert s.joiner.counters.impressions == 1 and "i1" in s.joiner.pending


def test_impression_features_follow_the_items_attributes_at_impression_time() -> None:
    """Static item features are memoised per attributes object: an ``item`` event that
    changes the item shows in the impressions after it, not in those before it, and the
    same attributes give the same features at example precision."""
    s = shard()
    imps = [Impression(T0 + 10 + n, f"x{n}", "u", "a", f"r{n}", 0, {}) for n in range(4)]
    events = [Item(T0, "a", {"category": "c1", "price": 1.1}), imps[0], imps[1],
              Item(T0 + 12, "a", {"category": "c2", "price": 2.2}), imps[2],
              Item(T0 + 13, "a", {"category": "c2", "price": 2.2}), imps[3]]
    out = s.process("u000", events)
    out["examples"] = out.get("examples", []) + s.flush()["examples"]
    features = {e["example_id"]: e["features"] for e in out["examples"]}
    assert features["imp:x0"] == features["imp:x1"] == {"i:category": "c1", "i:price": 1.1}
    assert features["imp:x2"] == features["imp:x3"] == {"i:category": "c2", "i:price": 2.2}


def test_a_resumed_shard_writes_the_form_the_flow_now_asks() -> None:
    """Examples in their wire form (no in-flow trainer) or as full records: set at every
    start, so a shard resumed from a run without a trainer feeds the trainer of a run
    with one full records."""
    import pickle

    from operators.example_codec import pack_example

    events = [Impression(T0, "m1", "u", "a", "r", 0, {}), Feedback(T0 + 5, "u", "a", "click", "m1")]
    wired = shard(wire_examples=True)
    resumed = pickle.loads(pickle.dumps(wired))
    record = shard().process("u000", events)["examples"]
    assert wired.process("u000", events)["examples"] == [pack_example(e) for e in record]
    resumed.write_wire(False)
    assert resumed.process("u000", events)["examples"] == record


def _request_log() -> list[Any]:
    """Requests of several impressions (ids repeated inside and across requests, clicks
    before and after their impression, a bad ts order), users with attributes, items."""
    events: list[Any] = [Item(T0, "a", {"category": "c1", "price": 1.5}),
                         Item(T0, "b", {"category": "c2"}), User(T0, "u1", {"age": 30})]
    for r in range(40):
        ts, user = T0 + 1000 * r, f"u{r % 3}"
        events.append(Request(ts, f"r{r}", user))
        if r % 7 == 3:  # a click arriving before its impression (an orphan)
            events.append(Feedback(ts, user, "b", "click", f"m{r}-1"))
        for p in range(4 if r % 5 else 1):
            iid = f"m{r}-{p}" if r % 9 != 4 else f"m{r}-0"  # a request repeating an id
            events.append(Impression(ts, iid, user, "ab"[p % 2] if p < 2 else f"x{p}", f"r{r}", p,
                                     {"d": "web"}))
        if r % 4 == 1:
            events.append(Feedback(ts + 10, user, "a", "click", f"m{r}-0"))
        if r % 6 == 2:
            events.append(Feedback(ts + 20, user, "a", "rating", None, 5.0))
        if r == 20:
            events.append(Impression(T0, "m1-0", user, "a", "rdup", 0))  # a duplicate id
    return events


def test_a_requests_impressions_join_as_one_run_with_the_same_outputs() -> None:
    """``Joiner.on_impressions`` (a request's impressions as one run, taken when the shard's
    impressions only join) writes exactly what one ``on_impression`` per impression writes:
    examples, late labels, counters, in both row forms, at r = 1 and r = 0.5, with
    repeated ids, orphans and a pending bound that forces closes."""
    events = _request_log()
    for rate in (1.0, 0.5):
        for wire in (False, True):
            for max_pending in (50_000, 6):
                def run(runs: bool, rate: float = rate, wire: bool = wire,
                        max_pending: int = max_pending) -> tuple[Any, ...]:
                    s = UserShard(JoinConfig(interaction_negatives=2, max_pending=max_pending,
                                             wait_ms_override=3_000), NegativeSampler(rate, 3),
                                  wire_examples=wire)
                    if not runs:  # the per-event path
                        s.profiles = {"off": None}  # type: ignore[dict-item]
                        s._profile = lambda event: None  # type: ignore[method-assign]
                    outs = [s.process("u000", events[i:i + 9]) for i in range(0, len(events), 9)]
                    outs.append(s.flush())
                    return (sum((o.get("examples", []) for o in outs), []),
                            sum((o.get("late-labels", []) for o in outs), []),
                            s.counters(), [o.get("example-counts") for o in outs])
                one, runs = run(False), run(True)
                assert runs == one and len(one[0]) > 20, (rate, wire, max_pending)


def test_item_events_on_the_runs_path_equal_the_per_event_path() -> None:
    """``item`` events taken by ``_catalog_items`` (the runs path) leave the catalog (its
    entries, order and write count), the clock, the closed windows, the item updates (or
    none made, with the shard's counters sent) as ``_apply`` does, and one that fails is
    the same dead letter."""
    events = [Item(T0, "a", {"category": "c1"}), Item(T0, "b", {"price": 2.5}, False),
              Impression(T0 + 5, "m1", "u1", "a", "r1", 0, {}),
              Impression(T0 + 5, "m2", "u1", "b", "r1", 1, {}),
              Item(T0 + 4_000, "a", {"category": "c2"}),  # the clock moves: m1, m2 close
              Item(T0 + 4_000, "c", {}), Item(T0 + 3_000, "bad", None),  # type: ignore[arg-type]
              Item(T0 + 4_000, "d", {"price": 1.0})]  # (attrs None: its catalog entry fails)
    for updates in (True, False):
        seen: list[Any] = []
        for runs in (False, True):
            s = UserShard(JoinConfig(wait_ms_override=1_000, allowed_lateness_ms=0),
                          NegativeSampler(1.0, 0))
            s.item_updates = updates
            if not runs:  # the per-event path
                s.profiles = {"off": None}  # type: ignore[dict-item]
                s._profile = lambda event: None  # type: ignore[method-assign]
            out = s.process("u000", events)
            for d in out["dead-letters"]:
                d.pop("ingest_ts")
            seen.append((list(s.catalog.items()), s.catalog.version, s.joiner.max_ts_ms,
                         out["examples"], out["dead-letters"], out.get("item-updates"),
                         out["counters"]))
        assert seen[1] == seen[0]
        assert len(seen[0][5] or ()) == (5 if updates else 0)
    assert len(seen[0][3]) == 2 and [d["error"] for d in seen[0][4]] == [
        "TypeError: 'NoneType' object is not iterable"]
    assert [key for key, _ in seen[0][0]] == ["b", "a", "c", "d"] and seen[0][1] == 5


def test_a_close_of_runs_and_single_impressions_hashes_each_impression_once() -> None:
    """At r < 1 a run's keep decisions are taken at the intake (its flags); a window
    closing with them and with impressions taken one by one (a request of one) hashes
    only the latter: each impression id reaches the sampler once, and the examples
    equal the per-event path's (which decides every one at the close)."""
    events = [Impression(T0 + 10 * r, f"m{r}-{p}", "u1", f"i{p}", f"r{r}", p, {})
              for r in range(30) for p in range(1 if r % 3 == 0 else 4)]
    outs: list[list[Any]] = []
    for runs in (False, True):
        s = UserShard(JoinConfig(wait_ms_override=3_000), NegativeSampler(0.3, 1))
        if not runs:  # the per-event path
            s.profiles = {"off": None}  # type: ignore[dict-item]
            s._profile = lambda event: None  # type: ignore[method-assign]
        hashed: list[str] = []
        keep_impressions = s.joiner.sampler.keep_impressions

        def spy(ids: list[str], keep: Any = keep_impressions, seen: list[str] = hashed) -> Any:
            seen.extend(ids)
            return keep(ids)

        s.joiner.sampler.keep_impressions = spy  # type: ignore[method-assign]
        out = [s.process("u000", events[i:i + 7]) for i in range(0, len(events), 7)]
        out.append(s.flush())
        outs.append(sum((o.get("examples", []) for o in out), []))
        assert sorted(hashed) == sorted(e.impression_id for e in events), runs
    assert outs[1] == outs[0] and 0 < len(outs[0]) < len(events)


def test_a_run_takes_the_rows_free_pop_gives_and_counts_each_impression_once() -> None:
    """A run as long as the free rows, shorter and longer: ``Joiner.on_impressions``
    takes the rows one ``pending.add`` per impression takes (the last freed first) and
    counts each impression once: the same counters, pending rows and free rows as the
    per-event path, after each batch."""
    def batch(n_req: int, size: int) -> list[Any]:
        ts = T0 + 10_000 * n_req  # each request closes the windows before it
        return [Impression(ts, f"m{n_req}-{j}", "u1", f"i{j}", f"r{n_req}", j, {})
                for j in range(size)]

    states: list[list[Any]] = [[], []]
    for runs, seen in zip((False, True), states, strict=True):
        s = UserShard(JoinConfig(wait_ms_override=3_000, allowed_lateness_ms=0),
                      NegativeSampler(1.0, 0))
        if not runs:  # the per-event path
            s.profiles = {"off": None}  # type: ignore[dict-item]
            s._profile = lambda event: None  # type: ignore[method-assign]
        for n_req, size in enumerate((3, 3, 2, 4, 4, 1)):
            s.process("u000", batch(n_req, size))
            pending = s.joiner._pending
            seen.append((s.joiner.counters.as_dict(), dict(pending.rows), list(pending.free)))
    assert states[1] == states[0]
    assert states[0][1][0]["impressions"] == 6 and states[0][1][2] == []  # 3 rows reused


def test_a_resumed_shard_turns_computed_wire_features_back_into_dicts() -> None:
    """Impressions joined as a run have their features computed at once (in the wire form
    when the rows are wire rows); a shard resumed under a config that writes full records
    turns them back into the dicts, exactly."""
    import pickle

    events = [User(T0, "u", {"age": 3}), Item(T0, "a", {"category": "c", "price": 2.5}),
              Impression(T0, "m1", "u", "a", "r", 0, {}), Impression(T0, "m2", "u", "b", "r", 1, {})]
    wired = shard(wire_examples=True)
    wired.process("u000", events)
    assert all(type(e.features) is list for e in wired.joiner.pending.values())
    resumed = pickle.loads(pickle.dumps(wired))
    resumed.write_wire(False)
    record = shard()
    record.process("u000", events)
    assert resumed.flush()["examples"] == record.flush()["examples"]


def joiner_path_stream(n: int = 400) -> list[Any]:
    """Users with attributes, items with attributes (one changes), requests of 5
    impressions, clicks, late and organic feedback: the joiner path's events (no
    snapshots, no profiles)."""
    events: list[Any] = [Item(T0, f"i{k}", {"category": f"c{k % 3}", "price": 1.5 + k})
                         for k in range(12)]
    events += [User(T0, f"u{k}", {"age_bucket": "25-34", "country": "DE"}) for k in range(5)]
    for n_req in range(n // 5):
        ts, user = T0 + 1_000 * n_req, f"u{n_req % 7}"  # u5, u6: no attributes
        events += [Impression(ts, f"m{n_req}-{j}", user, f"i{(n_req + 3 * j) % 12}",
                              f"r{n_req}", j, {"device": "web"}) for j in range(5)]
        if n_req % 4 == 0:
            events.append(Feedback(ts + 500, user, f"i{n_req % 12}", "click", f"m{n_req}-0"))
        if n_req % 9 == 0:
            events.append(Feedback(ts + 700, user, f"i{(n_req + 5) % 12}", "view"))
        if n_req == 30:
            events.append(Item(ts + 800, "i4", {"category": "c9", "price": 0.0}))
    return events


def test_wire_rows_of_the_joiner_path_are_the_packed_records() -> None:
    """Without snapshots (``PointInTime._resolve_plain``) a shard writing wire rows writes
    the packed full records, byte for byte, in the same order, kept or downsampled."""
    import orjson

    from operators.example_codec import pack_example

    events = joiner_path_stream()
    for rate in (1.0, 0.3):
        records, wired = (UserShard(JoinConfig(), NegativeSampler(rate, 0)) for _ in range(2))
        wired.write_wire(True)
        rows: list[list[Any]] = [[], []]
        for s, out in zip((records, wired), rows, strict=True):
            for i in range(0, len(events), 37):
                out += s.process("u000", events[i:i + 37]).get("examples", [])
            out += s.flush().get("examples", [])
        assert len(rows[0]) > 100 and {r["example_id"][:4] for r in rows[0]} == {
            "imp:", "int:", "neg:"}
        assert [orjson.dumps(pack_example(r)) for r in rows[0]] == [
            orjson.dumps(r) for r in rows[1]]


def test_plain_features_with_and_without_a_profile_equal_the_per_item_path() -> None:
    """``PointInTime._resolve_plain`` (a request's items at once, no snapshots) gives the
    examples of one ``example_features`` call per item, bit for bit, with an empty profile
    (its name-overlap tests skipped) and with a user profile feature."""
    spec = {"name": "clicks", "entity": "user", "aggregate": "count",
            "filter": {"type": "feedback", "action": "click"}, "windows": ["1h"]}
    events = joiner_path_stream()
    for features in ([], [spec]):
        together, alone = (UserShard(JoinConfig(), NegativeSampler(1.0, 0), features=features)
                           for _ in range(2))
        alone.context.features_run = None  # the joiner falls back per item
        rows: list[list[Any]] = [[], []]
        for s, out in zip((together, alone), rows, strict=True):
            for i in range(0, len(events), 37):
                out += s.process("u000", events[i:i + 37]).get("examples", [])
            out += s.flush().get("examples", [])
        assert len(rows[0]) > 100 and rows[0] == rows[1]
        assert any("user.clicks.1h" in r["features"] for r in rows[0]) == bool(features)


def test_a_shard_without_item_updates_writes_the_same_outputs_and_counters() -> None:
    """``item_updates`` false (a flow without an item side): no ``Interaction`` or
    ``CatalogChange`` is made; every other output of every batch is the same, the
    counters included, sent in the same batches (one holding only an ``item`` event)."""
    events = joiner_path_stream()
    batches = [events[i:i + 37] for i in range(0, len(events), 37)]
    batches.insert(3, [Item(T0 + 3_500, "i2", {"category": "c1", "price": 4.0})])
    made, unmade = (UserShard(JoinConfig(), NegativeSampler(0.5, 0)) for _ in range(2))
    unmade.item_updates = False
    kinds: set[str] = set()
    for batch in batches + [None]:
        outs = [s.flush() if batch is None else s.process("u000", batch) for s in (made, unmade)]
        kinds.update(type(u).__name__ for u in outs[0].pop("item-updates", ()))
        outs[0].pop("batch", None)
        assert outs[0] == outs[1] and "item-updates" not in outs[1]
    assert kinds == {"Interaction", "CatalogChange"}


def test_plain_rows_by_names_identity_only_where_the_profile_check_holds() -> None:
    """``_resolve_plain`` builds an item's wire row from the head of the last static names
    it checked against the profile, told by identity (``_STATIC_NAMES``: one object per
    names whose static features kept every name). An item whose None attribute was
    compacted away has the same rounded names but a static name in the profile: it gets
    the merged features, also when it comes from the memo after such a row."""
    from collections import OrderedDict

    from models.features import compact
    from operators.example_codec import unwire_features
    from operators.point_in_time import PointInTime, UserContext, static_item_features
    from state.join_state import float32_features

    catalog: OrderedDict[str, dict[str, Any]] = OrderedDict()
    catalog["a"] = {"price": 2.5}
    catalog["b"] = {"category": None, "price": 3.5}  # i:category compacted away
    catalog["c"] = {"price": 4.5}
    context = PointInTime(catalog=catalog)
    profile = {"u:country": "DE", "i:category": "c9"}
    items = ["b", "a", "b", "c", "a"]  # the second b and a: from the memo
    out: list[Any] = [None] * len(items)
    context._resolve_plain(UserContext("u1", [], {}, None, profile), items,
                           [catalog[i] for i in items], [False] * 5, range(5), out, True)
    merged = [float32_features(compact({**profile, **static_item_features(i, None, catalog[i])}))
              for i in items]  # resolve_all's general merge, item by item
    assert [type(row) for row in out] == [dict, list, dict, list, list]
    assert [unwire_features(row) if type(row) is list else row for row in out] == merged
