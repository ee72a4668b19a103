"""The event model (docs/events.md): typed records, validation, dead letters.

Every input (a JSON line, a Kafka message value, or a dict from the simulator) is
either parsed into one of the typed records below or turned into a dead-letter
record ``{"reason", "detail", "raw", "ingest_ts"}``. Parsing never raises.

Invariants of a parsed record: ``ts`` is an int in epoch milliseconds within
``[min_ts_ms, MAX_TS_MS]`` (``min_ts_ms`` defaults to ``MIN_TS_MS``, 1973) and not further ahead of the stream watermark than the
configured skew; every ID is a non-empty ``str`` (integer IDs are turned into
their decimal string); optional fields hold their documented defaults.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)

Record = dict[str, Any]
"""A JSON-shaped record (an output row, a raw event, a dead letter): the one alias."""

MAX_TS_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z in epoch ms; later timestamps are absurd."""

MIN_TS_MS = 100_000_000_000
"""Default floor of ``ts`` (1973-03-03 in epoch ms): smaller values are almost surely
seconds, not milliseconds (``parse.min_ts_ms``; MovieLens' 1997 logs are ~8.7e11)."""

MAX_ID_LEN = 256
"""Longest accepted ID, in characters."""

MAX_RAW_IN_DEAD_LETTER = 4096
"""Raw input longer than this (bytes) is truncated inside its dead-letter record."""

MAX_DEPTH = 32
"""Deepest accepted nesting of objects and arrays; the event object itself is level 1.
Deeper payloads could not be written back out (orjson serialises at most 254 levels,
and examples embed ``context`` one level down) nor pickled reliably (Python's
recursion limit), so they are dead letters (``too_deep``)."""


class _Record:
    """Mapping-style read access (``event.get("ts")``) for code written against dicts,
    and a compact pickle: ``(class, field values)``.

    Events cross processes inside item updates (``ProfileEvent``, ``CatalogChange``)
    whenever a flow runs on several (``-i/-a``). A ``slots`` dataclass otherwise pickles
    through the ``__getstate__``/``__setstate__`` that ``dataclass`` writes in Python
    (a ``fields()`` walk and one ``object.__setattr__`` per field on load); as
    ``(class, values)`` 1,000 impressions in ``ProfileEvent`` s pickle in ~40% less time,
    load in ~45% less and take 25% fewer bytes (two runs in one process each, e.g. 3.4
    vs 5.5 ms and 2.0 vs 3.6 ms; docs/architecture.md, scale-out).
    """

    __slots__ = ()

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        cls = type(self)
        values = _FIELD_GETTERS.get(cls)
        if values is None:  # every event type has two fields or more: a tuple
            values = _FIELD_GETTERS[cls] = operator.attrgetter(*cls.__slots__)
        return cls, values(self)


_FIELD_GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
"""Per event class, its fields' values in constructor order (``_Record.__reduce__``)."""


@dataclass(slots=True)
class Impression(_Record):
    """An item shown to a user. ``position`` is 0-based, -1 when unknown."""

    ts: int
    impression_id: str
    user_id: str
    item_id: str
    request_id: str | None = None
    position: int = -1
    context: dict[str, Any] = field(default_factory=dict)
    type = "impression"


@dataclass(slots=True)
class Feedback(_Record):
    """A user action on an item; ``impression_id`` is None for organic interactions."""

    ts: int
    user_id: str
    item_id: str
    action: str
    impression_id: str | None = None
    value: float = 1.0
    context: dict[str, Any] = field(default_factory=dict)
    type = "feedback"


@dataclass(slots=True)
class Request(_Record):
    """A request for ``k`` recommendations for a user."""

    ts: int
    request_id: str
    user_id: str
    k: int = 10
    context: dict[str, Any] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    type = "request"


@dataclass(slots=True)
class Item(_Record):
    """Item catalog update: attributes and availability."""

    ts: int
    item_id: str
    attrs: dict[str, Any] = field(default_factory=dict)
    available: bool = True
    type = "item"


@dataclass(slots=True)
class User(_Record):
    """User attributes (user-provided data such as demographics)."""

    ts: int
    user_id: str
    attrs: dict[str, Any] = field(default_factory=dict)
    type = "user"


Event = Impression | Feedback | Request | Item | User

EVENT_TYPES = ("impression", "feedback", "request", "item", "user")


@dataclass(slots=True, frozen=True)
class Rejected:
    """Input a source already rejected while reading (a line over ``parse.max_bytes``,
    the unreadable rest of a damaged file); the parser turns it into a dead letter.
    ``raw`` is what is kept of the input, ``raw_bytes`` its full size when larger."""

    reason: str
    detail: str
    raw: bytes = b""
    raw_bytes: int | None = None

    def dead_letter(self) -> dict[str, Any]:
        record = dead_letter(self.raw, self.reason, self.detail)
        if self.raw_bytes is not None and self.raw_bytes > len(record["raw"]):
            record["raw_truncated"] = True
            record["raw_bytes"] = self.raw_bytes
        return record


class Invalid(Exception):
    """A validation failure: ``reason`` is a stable code, ``detail`` a human message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _id(obj: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if type(value) is str and 0 < len(value) <= MAX_ID_LEN:
        return value  # the common case, without the checks below
    if value is None:
        if required:
            raise Invalid("missing_field", f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Invalid("wrong_type", f"'{name}' must be a string or integer, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text or len(text) > MAX_ID_LEN:
        raise Invalid("invalid_value", f"'{name}' must have 1..{MAX_ID_LEN} characters")
    return text


def _dict(obj: dict[str, Any], name: str) -> dict[str, Any]:
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid("wrong_type", f"'{name}' must be an object, got {type(value).__name__}")
    return value


def _int(obj: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("wrong_type", f"'{name}' must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise Invalid("invalid_value", f"'{name}' must be in [{lo}, {hi}], got {value}")
    return value


def _number(obj: dict[str, Any], name: str, default: float) -> float:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid("wrong_type", f"'{name}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise Invalid("invalid_value", f"'{name}' must be finite")
    return value


def _build(kind: str, obj: dict[str, Any], ts: int) -> Event:
    if kind == "impression":
        return Impression(
            ts,
            _id(obj, "impression_id"),
            _id(obj, "user_id"),
            _id(obj, "item_id"),
            _id(obj, "request_id", required=False),
            _int(obj, "position", -1, -1, 100_000),
            _dict(obj, "context"),
        )
    if kind == "feedback":
        action = obj.get("action")
        if action is None:
            raise Invalid("missing_field", "'action' is required")
        if not isinstance(action, str) or not action or len(action) > 64:
            raise Invalid("wrong_type", "'action' must be a non-empty string of at most 64 characters")
        return Feedback(
            ts,
            _id(obj, "user_id"),
            _id(obj, "item_id"),
            action,
            _id(obj, "impression_id", required=False),
            _number(obj, "value", 1.0),
            _dict(obj, "context"),
        )
    if kind == "request":
        exclude = obj.get("exclude")
        if exclude is None:
            exclude = []
        elif not isinstance(exclude, list) or len(exclude) > 10_000:
            raise Invalid("wrong_type", "'exclude' must be a list of at most 10000 IDs")
        else:
            exclude = [_id({"exclude": x}, "exclude") for x in exclude]
        return Request(
            ts,
            _id(obj, "request_id"),
            _id(obj, "user_id"),
            _int(obj, "k", 10, 1, 1000),
            _dict(obj, "context"),
            exclude,
        )
    if kind == "item":
        available = obj.get("available", True)
        if not isinstance(available, bool):
            raise Invalid("wrong_type", "'available' must be a boolean")
        return Item(ts, _id(obj, "item_id"), _dict(obj, "attrs"), available)
    return User(ts, _id(obj, "user_id"), _dict(obj, "attrs"))


def _too_deep(obj: dict[str, Any], limit: int) -> bool:
    """True when objects/arrays inside ``obj`` (level 1) nest deeper than ``limit``.

    Iterative (no recursion on hostile input); a flat event costs one pass over its
    top-level values (~0.4 us)."""
    stack: list[tuple[Any, int]] | None = None
    for value in obj.values():
        kind = type(value)
        if (kind is dict or kind is list) and value:
            if stack is None:
                stack = []
            stack.append((value, 2))
    if stack is None:
        return False
    while stack:
        value, depth = stack.pop()
        for child in (value.values() if isinstance(value, dict) else value):
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                if child:
                    stack.append((child, depth + 1))
    return False


def event_to_dict(event: Event) -> dict[str, Any]:
    """The canonical JSON-ready dict of a parsed event (inverse of parsing)."""
    out: dict[str, Any] = {"type": event.type}
    for name in event.__slots__:
        out[name] = getattr(event, name)
    return out


_BRACKETS = b"{["
"""The bytes that open an object or an array: a line holds as many as its length less
that of the line without them (one pass in C, ~0.1 us less a line than two counts)."""

_OPEN_ARRAY, _OPEN_OBJECT = ord("["), ord("{")
"""A line without ``[`` (``in``: one ``memchr``) holds as many opening brackets as ``{``
(one count): the bracket bound in ~2.2k instructions instead of ``translate``'s ~3.7k
(callgrind); lines with ``[`` count both (``_BRACKETS``)."""

_IMPRESSION = operator.itemgetter("ts", "impression_id", "user_id", "item_id", "request_id",
                                  "position", "context")
"""An impression's fields in one call (``EventParser.parse_many``; KeyError when one is
left out)."""


class EventParser:
    """Parses raw inputs into events or dead letters; tracks the stream watermark.

    ``max_bytes`` bounds a raw payload (bytes). ``max_future_skew_ms`` bounds how far
    an event may be ahead of ``max(watermark, wall clock)``, the watermark being the
    highest valid ``ts`` seen so far. Taking the wall clock too means a legitimate gap
    in an old log (MovieLens has multi-day pauses) never starts rejecting everything
    after it: in a replay of an old log only timestamps beyond the present are
    rejected; in a live stream the two references coincide. ``clock_ms`` is the wall
    clock (epoch ms), injectable for tests. ``min_ts_ms``: smaller ``ts`` values (but
    >= 0) are dead letters with reason ``ts_seconds`` (a producer sending seconds).
    """

    def __init__(self, max_bytes: int = 65_536, max_future_skew_ms: int = 86_400_000,
                 clock_ms: Callable[[], int] | None = None, min_ts_ms: int = MIN_TS_MS) -> None:
        self.max_bytes = max_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.min_ts_ms = min_ts_ms
        self.clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.watermark_ms: int | None = None
        self.dead_in_last = 0
        """Dead letters among the results of the last ``parse_many``."""

    def parse(self, raw: bytes | str | dict[str, Any] | Rejected) -> Event | dict[str, Any]:
        """Return a typed event, or a dead-letter dict when ``raw`` is invalid."""
        if type(raw) is bytes and len(raw) <= self.max_bytes:
            # The common case (a log line, a Kafka value) without the general path's
            # checks of the input's kind; anything unusual takes the general path.
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if type(obj) is dict and (
                    _OPEN_ARRAY not in raw and raw.count(_OPEN_OBJECT) <= MAX_DEPTH
                    or len(raw) - len(raw.translate(None, _BRACKETS)) <= MAX_DEPTH):
                try:
                    return self._checked(obj)
                except Invalid as err:
                    return dead_letter(raw, err.reason, err.detail)
        if isinstance(raw, Rejected):
            return raw.dead_letter()
        try:
            return self._parse(raw)
        except Invalid as err:
            return dead_letter(raw, err.reason, err.detail)

    def parse_batch(self, raws: list[Any]) -> tuple[list[Event], list[dict[str, Any]]]:
        """Parse a micro-batch in order; returns (events, dead letters)."""
        outs = self.parse_many(raws)
        if self.dead_in_last == 0:
            return outs, []  # type: ignore[return-value]
        events: list[Event] = []
        dead: list[dict[str, Any]] = []
        for out in outs:
            if type(out) is dict:
                dead.append(out)
            else:
                events.append(out)  # type: ignore[arg-type]
        return events, dead

    def parse_many(self, raws: list[Any]) -> list[Event | dict[str, Any]]:
        """``parse`` of each input, in order (``dead_in_last``: how many are dead letters).

        One call per micro-batch: a bytes line that decodes to a plain impression (every
        field present, of the common shape: ``int`` ``ts`` within the bounds and the skew
        of the watermark, string IDs of 1..``MAX_ID_LEN`` characters, a ``position`` int in
        range, a ``context`` object or null), feedback (string IDs, an action of 1..64
        characters, a finite float ``value`` or none), request (an int ``k`` in range or
        none, no ``exclude``), item (a bool ``available`` or none) or user (``attrs`` an
        object or null for both) is built in the loop itself; any other input takes
        ``parse``'s checks, so every result is ``parse``'s. (Impressions are ~86% of a
        log; the checks in one loop instead of a call chain per line: ~1 us less a line
        of ~3.5; feedback and requests ~1.5-3 us less; an impression's fields set one by one
        on ``object.__new__(Impression)``, without the dataclass's ``__init__``: ~0.25 us
        less.)"""
        out: list[Event | dict[str, Any]] = []
        append = out.append
        loads, error, max_bytes = orjson.loads, orjson.JSONDecodeError, self.max_bytes
        new = object.__new__
        low, skew = max(self.min_ts_ms, 0), self.max_future_skew_ms
        watermark = self.watermark_ms
        high = min((watermark or 0) + skew, MAX_TS_MS)
        dead = 0
        for raw in raws:
            if type(raw) is bytes and len(raw) <= max_bytes:
                try:
                    obj = loads(raw)
                except error:
                    obj = None
                if type(obj) is dict and (  # at most MAX_DEPTH brackets (_OPEN_ARRAY)
                        _OPEN_ARRAY not in raw and raw.count(_OPEN_OBJECT) <= MAX_DEPTH
                        or len(raw) - len(raw.translate(None, _BRACKETS)) <= MAX_DEPTH):
                    kind, event = obj.get("type"), None
                    # (A string is no longer than its line: a line of at most MAX_ID_LEN
                    # bytes holds no ID that is too long.)
                    if kind == "impression":
                        try:
                            ts, iid, user, item, request, position, context = _IMPRESSION(obj)
                        except KeyError:  # an optional field left out: the general path
                            ts = None
                        if (type(ts) is int and low <= ts <= high
                                and type(iid) is str and type(user) is str
                                and type(item) is str and iid and user and item
                                and (request is None or type(request) is str and request)
                                and type(position) is int and -1 <= position <= 100_000
                                and (context is None or type(context) is dict)
                                and (len(raw) <= MAX_ID_LEN or max(
                                    len(iid), len(user), len(item), len(request or "")
                                ) <= MAX_ID_LEN)):
                            # Built field by field: the generated __init__'s frame costs
                            # ~0.25 us of ~0.55 an impression; every field is set here.
                            event = new(Impression)
                            event.ts, event.impression_id, event.user_id = ts, iid, user
                            event.item_id, event.request_id = item, request
                            event.position = position
                            event.context = {} if context is None else context
                    elif kind == "feedback":
                        get = obj.get
                        ts, user, item, action = (get("ts"), get("user_id"), get("item_id"),
                                                  get("action"))
                        iid, value, context = get("impression_id"), get("value"), get("context")
                        if (type(ts) is int and low <= ts <= high
                                and type(user) is str and type(item) is str and user and item
                                and type(action) is str and 0 < len(action) <= 64
                                and (iid is None or type(iid) is str and iid)
                                and (value is None or type(value) is float
                                     and value - value == 0.0)  # finite
                                and (context is None or type(context) is dict)
                                and (len(raw) <= MAX_ID_LEN or max(
                                    len(user), len(item), len(iid or "")) <= MAX_ID_LEN)):
                            event = Feedback(ts, user, item, action, iid,
                                             1.0 if value is None else value,
                                             {} if context is None else context)
                    elif kind == "request":
                        get = obj.get
                        ts, request, user, k = get("ts"), get("request_id"), get("user_id"), get("k")
                        context = get("context")
                        if (type(ts) is int and low <= ts <= high
                                and type(request) is str and type(user) is str and request and user
                                and (k is None or type(k) is int and 1 <= k <= 1000)
                                and (context is None or type(context) is dict)
                                and get("exclude") is None
                                and (len(raw) <= MAX_ID_LEN
                                     or max(len(request), len(user)) <= MAX_ID_LEN)):
                            event = Request(ts, request, user, 10 if k is None else k,
                                            {} if context is None else context, [])
                    elif kind == "item" or kind == "user":
                        get = obj.get
                        ts, attrs = get("ts"), get("attrs")
                        key = get("item_id" if kind == "item" else "user_id")
                        available = get("available", True)  # (items only)
                        if (type(ts) is int and low <= ts <= high and type(key) is str and key
                                and (attrs is None or type(attrs) is dict)
                                and (len(raw) <= MAX_ID_LEN or len(key) <= MAX_ID_LEN)):
                            if attrs is None:
                                attrs = {}
                            if kind == "user":
                                event = User(ts, key, attrs)
                            elif type(available) is bool:
                                event = Item(ts, key, attrs, available)
                    if event is not None:
                        append(event)
                        if watermark is None or ts > watermark:
                            watermark = ts
                            high = min(ts + skew, MAX_TS_MS)
                        continue
                    self.watermark_ms = watermark
                    try:
                        append(self._checked(obj))
                    except Invalid as err:
                        append(dead_letter(raw, err.reason, err.detail))
                        dead += 1
                    watermark = self.watermark_ms
                    high = min((watermark or 0) + skew, MAX_TS_MS)
                    continue
            self.watermark_ms = watermark
            parsed = self.parse(raw)
            append(parsed)
            dead += type(parsed) is dict
            watermark = self.watermark_ms
            high = min((watermark or 0) + skew, MAX_TS_MS)
        self.watermark_ms = watermark
        self.dead_in_last = dead
        return out

    def _parse(self, raw: bytes | str | dict[str, Any]) -> Event:
        if isinstance(raw, dict):
            obj: Any = raw
        else:
            if len(raw) > self.max_bytes:
                raise Invalid("oversized", f"payload of {len(raw)} bytes exceeds {self.max_bytes}")
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                if str(err).startswith("depth limit exceeded"):
                    raise Invalid("too_deep", f"nesting deeper than {MAX_DEPTH} levels") from None
                raise Invalid("malformed_json", str(err)) from None
            if not isinstance(obj, dict):
                raise Invalid("not_object", f"expected a JSON object, got {type(obj).__name__}")
            # An object cannot nest deeper than it has brackets: the walk below runs only
            # for payloads with more than MAX_DEPTH of them (~0.1 us instead of ~1 us).
            brackets = (b"{", b"[") if isinstance(raw, bytes | bytearray) else ("{", "[")
            if raw.count(brackets[0]) + raw.count(brackets[1]) <= MAX_DEPTH:
                return self._checked(obj)
        if _too_deep(obj, MAX_DEPTH):
            raise Invalid("too_deep", f"nesting deeper than {MAX_DEPTH} levels")
        return self._checked(obj)

    def _checked(self, obj: dict[str, Any]) -> Event:
        """The event of a decoded object no deeper than ``MAX_DEPTH``."""
        kind = obj.get("type")
        if kind is None:
            raise Invalid("missing_field", "'type' is required")
        if kind not in EVENT_TYPES:
            raise Invalid("unknown_type", f"unknown event type {str(kind)[:64]!r}")
        ts = obj.get("ts")
        if ts is None:
            raise Invalid("missing_field", "'ts' is required")
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise Invalid("bad_ts", f"'ts' must be integer epoch ms, got {type(ts).__name__}")
        if ts < 0 or ts > MAX_TS_MS:
            raise Invalid("absurd_ts", f"'ts' {ts} is outside [0, {MAX_TS_MS}] (1970..2100)")
        if ts < self.min_ts_ms:
            raise Invalid("ts_seconds", f"'ts' {ts} is below {self.min_ts_ms} (parse.min_ts_ms): "
                          "epoch seconds instead of milliseconds?")
        watermark = self.watermark_ms
        if ts > (watermark or 0) + self.max_future_skew_ms:
            reference = max(watermark or 0, self.clock_ms())
            if ts > reference + self.max_future_skew_ms:
                raise Invalid(
                    "ts_ahead",
                    f"'ts' {ts} is {ts - reference} ms ahead of max(watermark, wall clock) "
                    f"{reference} (limit {self.max_future_skew_ms} ms)",
                )
        event = _build(kind, obj, ts)
        if watermark is None or ts > watermark:
            self.watermark_ms = ts
        return event


def dead_letter(raw: bytes | str | dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    """A dead-letter record: raw input (text, truncated past 4 KiB), reason code, detail, ingest time (ms)."""
    if isinstance(raw, dict):
        try:
            raw = orjson.dumps(raw, default=str)
        except TypeError:  # e.g. nested deeper than orjson writes
            try:
                raw = repr(raw).encode("utf-8", "backslashreplace")
            except RecursionError:
                raw = f"<{type(raw).__name__} nested too deep to print>".encode()
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "backslashreplace")
    record: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "raw": raw[:MAX_RAW_IN_DEAD_LETTER].decode("utf-8", "backslashreplace"),
        "ingest_ts": int(time.time() * 1000),
    }
    if len(raw) > MAX_RAW_IN_DEAD_LETTER:
        record["raw_truncated"] = True
        record["raw_bytes"] = len(raw)
    return record


_ERRORS_LOGGED: dict[str, int] = {}
"""Processing errors seen per stage in this process (tracebacks logged for the first few)."""


def processing_error(stage: str, raw: Event | dict[str, Any], err: BaseException) -> dict[str, Any]:
    """The dead letter of an input that a stateful stage failed to apply (reason
    ``processing_error``): the input, ``stage`` and ``error`` (exception type and text).

    Logged as an error; the first 10 per stage and process with their traceback, then
    every 1,000th."""
    error = f"{type(err).__name__}: {err}"[:1000]
    seen = _ERRORS_LOGGED[stage] = _ERRORS_LOGGED.get(stage, 0) + 1
    if seen <= 10 or seen % 1000 == 0:
        log.error("%s failed on an input (dead-lettered, %d so far in this process): %s",
                  stage, seen, error, exc_info=err if seen <= 10 else None)
    payload = event_to_dict(raw) if isinstance(raw, _Record) else raw
    record = dead_letter(payload, "processing_error", f"{stage}: {error}")
    record["stage"] = stage
    record["error"] = error
    return record
