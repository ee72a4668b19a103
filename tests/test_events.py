"""The event model: every kind of bad input becomes a dead letter with its reason."""

from __future__ import annotations

import orjson
import pytest

from events.model import (
    MAX_DEPTH,
    MAX_TS_MS,
    EventParser,
    Feedback,
    Impression,
    Item,
    Request,
    User,
    event_to_dict,
)

TS = 1_767_225_600_000


def line(**fields) -> bytes:
    return orjson.dumps(fields)


def test_every_type_parses_with_defaults() -> None:
    p = EventParser()
    imp = p.parse(line(type="impression", ts=TS, impression_id="i1", user_id=7, item_id="a"))
    assert imp == Impression(TS, "i1", "7", "a", None, -1, {})
    fb = p.parse(line(type="feedback", ts=TS, user_id="u", item_id="a", action="click"))
    assert fb == Feedback(TS, "u", "a", "click", None, 1.0, {})
    req = p.parse(line(type="request", ts=TS, request_id="r", user_id="u", exclude=["a", 3]))
    assert req == Request(TS, "r", "u", 10, {}, ["a", "3"])
    item = p.parse(line(type="item", ts=TS, item_id="a", attrs={"category": "c"}, available=False))
    assert item == Item(TS, "a", {"category": "c"}, False)
    assert p.parse(line(type="user", ts=TS, user_id="u")) == User(TS, "u", {})


def test_dict_input_and_round_trip() -> None:
    p = EventParser()
    event = {"type": "feedback", "ts": TS, "user_id": "u", "item_id": "a", "action": "rating",
             "value": 4, "impression_id": None, "context": {}}
    parsed = p.parse(event)
    assert isinstance(parsed, Feedback) and parsed.value == 4.0
    assert p.parse(event_to_dict(parsed)) == parsed


def test_old_logs_are_valid() -> None:
    movielens_1997 = 881_250_949_000
    assert isinstance(EventParser().parse(line(type="user", ts=movielens_1997, user_id="1")), User)


@pytest.mark.parametrize("ts", [0, 1, 1_000, TS // 1000, 99_999_999_999])
def test_ts_in_seconds_is_a_dead_letter(ts: int) -> None:
    """A producer sending epoch seconds (or any ts before 1973) is refused with
    ``ts_seconds``, not accepted silently as 1970 (issue 19 point 2)."""
    out = EventParser().parse(line(type="user", ts=ts, user_id="u"))
    assert isinstance(out, dict) and out["reason"] == "ts_seconds", out
    assert "parse.min_ts_ms" in out["detail"]


def test_ts_floor_is_configurable() -> None:
    assert isinstance(EventParser(min_ts_ms=0).parse(line(type="user", ts=1, user_id="u")), User)
    floor = EventParser(min_ts_ms=TS)
    assert isinstance(floor.parse(line(type="user", ts=TS, user_id="u")), User)
    assert floor.parse(line(type="user", ts=TS - 1, user_id="u"))["reason"] == "ts_seconds"
    assert floor.parse(line(type="user", ts=-1, user_id="u"))["reason"] == "absurd_ts"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"type": "user", "ts": 1', "malformed_json"),
        (b"\xff\xfe{}", "malformed_json"),
        (b'{"type":"user","ts":NaN,"user_id":"u"}', "malformed_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (line(ts=TS, user_id="u"), "missing_field"),
        (line(type="click", ts=TS, user_id="u"), "unknown_type"),
        (line(type="user", user_id="u"), "missing_field"),
        (line(type="user", ts="2026-01-01", user_id="u"), "bad_ts"),
        (line(type="user", ts=1.5e12, user_id="u"), "bad_ts"),
        (line(type="user", ts=True, user_id="u"), "bad_ts"),
        (line(type="user", ts=-1, user_id="u"), "absurd_ts"),
        (line(type="user", ts=MAX_TS_MS + 1, user_id="u"), "absurd_ts"),
        (line(type="impression", ts=TS, user_id="u", item_id="a"), "missing_field"),
        (line(type="impression", ts=TS, impression_id=[1], user_id="u", item_id="a"), "wrong_type"),
        (line(type="impression", ts=TS, impression_id="i", user_id="u", item_id="a", position="1"),
         "wrong_type"),
        (line(type="impression", ts=TS, impression_id="i", user_id="u", item_id="a", position=-5),
         "invalid_value"),
        (line(type="impression", ts=TS, impression_id="", user_id="u", item_id="a"), "invalid_value"),
        (line(type="impression", ts=TS, impression_id="x" * 300, user_id="u", item_id="a"),
         "invalid_value"),
        (line(type="feedback", ts=TS, user_id="u", item_id="a"), "missing_field"),
        (line(type="feedback", ts=TS, user_id="u", item_id="a", action=3), "wrong_type"),
        (line(type="feedback", ts=TS, user_id="u", item_id="a", action="c", value="1"), "wrong_type"),
        (line(type="feedback", ts=TS, user_id="u", item_id="a", action="c", context=[1]), "wrong_type"),
        (line(type="request", ts=TS, request_id="r", user_id="u", k=0), "invalid_value"),
        (line(type="request", ts=TS, request_id="r", user_id="u", exclude="a"), "wrong_type"),
        (line(type="item", ts=TS, item_id="a", available="yes"), "wrong_type"),
        (line(type="user", ts=TS, user_id=False), "wrong_type"),
        (line(type="user", ts=TS, user_id="u", attrs="x"), "wrong_type"),
    ],
)
def test_dead_letter_reasons(raw: bytes, reason: str) -> None:
    out = EventParser().parse(raw)
    assert isinstance(out, dict), out
    assert out["reason"] == reason, out
    assert out["detail"]
    assert isinstance(out["ingest_ts"], int)
    assert out["raw"] == raw.decode("utf-8", "backslashreplace")


def test_oversized_payload_is_dead_lettered_and_truncated() -> None:
    raw = line(type="user", ts=TS, user_id="u", attrs={"blob": "x" * 100_000})
    out = EventParser(max_bytes=65_536).parse(raw)
    assert out["reason"] == "oversized"
    assert out["raw_truncated"] is True and out["raw_bytes"] == len(raw)
    assert len(out["raw"]) == 4096
    assert isinstance(EventParser(max_bytes=1 << 20).parse(raw), User)


def test_ts_too_far_ahead_of_watermark_and_wall_clock() -> None:
    p = EventParser(max_future_skew_ms=1_000, clock_ms=lambda: TS)
    assert isinstance(p.parse(line(type="user", ts=TS, user_id="u")), User)
    assert isinstance(p.parse(line(type="user", ts=TS + 1_000, user_id="u")), User)
    out = p.parse(line(type="user", ts=TS + 5_000, user_id="u"))
    assert out["reason"] == "ts_ahead"
    assert p.watermark_ms == TS + 1_000
    assert isinstance(p.parse(line(type="user", ts=TS - 10_000_000, user_id="u")), User)


def test_gap_in_an_old_log_is_not_rejected() -> None:
    p = EventParser(max_future_skew_ms=86_400_000)  # real wall clock: 2026 or later
    day = 86_400_000
    old = 881_250_949_000  # 1997
    for ts in (old, old + 5 * day, old + 30 * day):  # multi-day pauses, as in MovieLens
        assert isinstance(p.parse(line(type="user", ts=ts, user_id="u")), User)
    far = p.parse(line(type="user", ts=p.clock_ms() + 10 * day, user_id="u"))
    assert far["reason"] == "ts_ahead"


def test_batch_keeps_every_valid_event_in_order() -> None:
    p = EventParser()
    raws = [line(type="user", ts=TS + i, user_id=f"u{i}") if i % 3 else b"{bad" for i in range(30)]
    events, dead = p.parse_batch(raws)
    assert [e.user_id for e in events] == [f"u{i}" for i in range(30) if i % 3]
    assert len(dead) == 10 and {d["reason"] for d in dead} == {"malformed_json"}


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1, 300, 5000])
def test_deep_nesting_is_a_dead_letter_not_a_crash(levels: int) -> None:
    """The event object is level 1 and ``attrs`` level 2: ``levels - 2`` arrays inside
    it make ``levels`` levels in all."""
    inner = b"[" * (levels - 2) + b"]" * (levels - 2)
    raw = b'{"type":"user","ts":%d,"user_id":"u","attrs":{"a":' % TS + inner + b"}}"
    out = EventParser(max_bytes=1 << 20).parse(raw)
    if levels <= MAX_DEPTH:
        assert isinstance(out, User)
        orjson.dumps({"features": {}, "context": event_to_dict(out)})  # writable
    else:
        assert out["reason"] == "too_deep", out


@pytest.mark.parametrize("levels", [MAX_DEPTH, MAX_DEPTH + 1, 300])
def test_deep_objects_without_arrays_are_dead_letters_in_both_paths(levels: int) -> None:
    """A line without ``[`` takes the bracket bound from its ``{`` alone: objects nested
    ``levels`` deep (an impression's context the second level) are dead letters past
    ``MAX_DEPTH`` in ``parse`` and ``parse_many`` alike, and braces inside strings only
    send a shallow line through the general path (same event)."""
    inner = b'{"a":' * (levels - 2) + b"1" + b"}" * (levels - 2)
    deep = (b'{"type":"impression","ts":%d,"impression_id":"m","user_id":"u","item_id":"a",'
            b'"request_id":"r","position":0,"context":{"a":' % TS + inner + b"}}")
    braces = line(type="impression", ts=TS, impression_id="{" * 40, user_id="u", item_id="a",
                  request_id="r", position=0, context={"d": "{" * 40})
    for raw in (deep, braces):
        one, many = EventParser(max_bytes=1 << 20), EventParser(max_bytes=1 << 20)
        out, [batch] = one.parse(raw), many.parse_many([raw])
        if raw is deep and levels > MAX_DEPTH:
            assert out["reason"] == batch["reason"] == "too_deep", (out, batch)
        else:
            assert isinstance(out, Impression) and batch == out


def test_events_pickle_as_class_and_field_values() -> None:
    """Events cross processes in item updates (``-i/-a``): each pickles as its class and
    its field values in constructor order (no dataclass ``__getstate__``/``__setstate__``
    walk), and loads equal, sharing nothing with the original but immutable values."""
    import pickle

    from operators.item_updates import CatalogChange, ProfileEvent

    events = [Impression(TS, "i1", "u", "a", "r1", 3, {"page": "home"}),
              Feedback(TS, "u", "a", "click", "i1", 2.5, {"d": [1]}),
              Request(TS, "r1", "u", 5, {"x": 1}, ["b"]),
              Item(TS, "a", {"category": "c"}, False),
              User(TS, "u", {"age": 30})]
    for event in events:
        cls, args = event.__reduce__()
        assert cls is type(event)
        assert args == tuple(getattr(event, name) for name in type(event).__slots__)
        loaded = pickle.loads(pickle.dumps(event))
        assert loaded == event and type(loaded) is type(event)
        assert loaded.context is not event.context if hasattr(event, "context") else True
    updates = [ProfileEvent("a", events[0]), CatalogChange("a", events[3])]
    assert pickle.loads(pickle.dumps(updates)) == updates


def test_batch_parse_equals_one_by_one() -> None:
    """``parse_many`` (impressions, feedback, requests, items and users of the common shape
    built in its loop) gives exactly what ``parse`` gives line by line, dead letters and the watermark
    included."""
    import pickle

    imp = {"type": "impression", "ts": TS, "impression_id": "m", "user_id": "u",
           "item_id": "a", "request_id": "r", "position": 3, "context": {"d": "web"}}
    variants = [{}, {"request_id": None}, {"position": None}, {"context": None},
                {"position": -1}, {"position": 100_000}, {"position": 100_001},
                {"position": True}, {"position": 2.0}, {"ts": True}, {"ts": TS * 1.0},
                {"ts": 5}, {"ts": -1}, {"ts": MAX_TS_MS + 1}, {"ts": TS + 10**12},
                {"ts": TS + 1_000}, {"ts": TS - 50}, {"user_id": 7}, {"user_id": ""},
                {"item_id": None}, {"impression_id": "x" * 256}, {"impression_id": "x" * 257},
                {"request_id": ""}, {"request_id": "r" * 300}, {"context": [1]},
                {"context": {"a": [[[]]]}}, {"type": "Impression"}, {"extra": 1}]
    raws: list = [line(**{**imp, **v, "impression_id": f"m{j}"} if "impression_id" not in v
                       else {**imp, **v}) for j, v in enumerate(variants)]
    raws += [line(**{k: v for k, v in imp.items() if k != name}) for name in imp]
    fb = {"type": "feedback", "ts": TS, "user_id": "u", "item_id": "a", "action": "click",
          "impression_id": "m", "value": 2.5, "context": {"d": "web"}}
    fb_variants = [{}, {"impression_id": None}, {"value": None}, {"value": 4}, {"value": True},
                   {"value": "1"}, {"value": 1e308 * 10}, {"value": -0.0}, {"context": None},
                   {"context": []}, {"action": ""}, {"action": "a" * 64}, {"action": "a" * 65},
                   {"action": 3}, {"action": None}, {"user_id": 7}, {"item_id": ""},
                   {"impression_id": ""}, {"impression_id": 5}, {"item_id": "i" * 256},
                   {"item_id": "i" * 257}, {"ts": TS + 10**12}, {"ts": 5}, {"ts": TS - 9},
                   {"ts": True}, {"user_id": "\u00e9"}]
    raws += [line(**{**fb, **v}) for v in fb_variants]
    raws += [line(**{k: v for k, v in fb.items() if k != name}) for name in fb]
    req = {"type": "request", "ts": TS, "request_id": "r", "user_id": "u", "k": 5,
           "context": {"d": "web"}}
    req_variants = [{}, {"k": None}, {"k": 0}, {"k": 1000}, {"k": 1001}, {"k": 5.0},
                    {"k": False}, {"exclude": None}, {"exclude": []}, {"exclude": ["a", 7]},
                    {"exclude": "a"}, {"context": None}, {"context": 1}, {"request_id": 9},
                    {"request_id": ""}, {"user_id": "u" * 257}, {"ts": TS + 10**12},
                    {"ts": -3}, {"ts": TS + 7}]
    raws += [line(**{**req, **v}) for v in req_variants]
    raws += [line(**{k: v for k, v in req.items() if k != name}) for name in req]
    item = {"type": "item", "ts": TS, "item_id": "a", "attrs": {"category": "c"}, "available": False}
    item_variants = [{}, {"attrs": None}, {"attrs": []}, {"attrs": "x"}, {"available": None},
                     {"available": 1}, {"available": True}, {"item_id": 7}, {"item_id": ""},
                     {"item_id": "i" * 256}, {"item_id": "i" * 257}, {"ts": TS + 10**12},
                     {"ts": 5}, {"ts": True}, {"ts": TS + 3}, {"user_id": "u"}]
    raws += [line(**{**item, **v}) for v in item_variants]
    raws += [line(**{k: v for k, v in item.items() if k != name}) for name in item]
    user = {"type": "user", "ts": TS, "user_id": "u", "attrs": {"age": 3}}
    user_variants = [{}, {"attrs": None}, {"attrs": [1]}, {"user_id": 7}, {"user_id": ""},
                     {"user_id": "u" * 256}, {"user_id": "u" * 257}, {"ts": -1},
                     {"ts": TS + 10**12}, {"ts": TS + 11}, {"item_id": "a"}, {"available": 3}]
    raws += [line(**{**user, **v}) for v in user_variants]
    raws += [line(**{k: v for k, v in user.items() if k != name}) for name in user]
    raws += [b'{"type": "user", "ts": 1', b"[1]", "text", {"type": "user", "ts": TS, "user_id": "d"},
             line(type="user", ts=TS, user_id="u", attrs={"a": [[[[]]]]}),
             line(type="feedback", ts=TS, user_id="u", item_id="a", action="click"),
             b'{"type":"impression","ts":%d,"impression_id":"q","user_id":"u","item_id":"a",'
             b'"request_id":"r","position":1,"context":%s}' % (TS, b"[" * 40 + b"]" * 40)]

    def plain(out):
        return {k: v for k, v in out.items() if k != "ingest_ts"} if isinstance(out, dict) else out

    for skew in (86_400_000, 500):
        one = EventParser(max_future_skew_ms=skew, clock_ms=lambda: TS)
        many = EventParser(max_future_skew_ms=skew, clock_ms=lambda: TS)
        expected = [plain(one.parse(raw)) for raw in raws]
        outs = many.parse_many(raws)
        assert [plain(out) for out in outs] == expected
        for out in outs:  # every field set (pickling reads each one)
            if not isinstance(out, dict):
                assert pickle.loads(pickle.dumps(out)) == out
        assert many.watermark_ms == one.watermark_ms
        assert many.dead_in_last == sum(isinstance(out, dict) for out in expected)
        events, dead = EventParser(max_future_skew_ms=skew, clock_ms=lambda: TS).parse_batch(raws)
        assert events == [out for out in expected if not isinstance(out, dict)]
        assert [plain(d) for d in dead] == [out for out in expected if isinstance(out, dict)]
