"""Hostile input (issue 9, point 3): mutated events mixed into a valid log.

A seeded fuzzer turns events of a simulated log into 10,000 invalid lines (truncated
JSON, wrong types, huge strings, deep nesting, NaN/inf, invalid UTF-8, absurd
timestamps, unknown types, ...), each with the dead-letter reason it must get. The
real flow (replay source, file outputs) runs once on the valid log and once on the
valid log with the hostile lines mixed in; the second run must not crash, must put
every hostile line in ``dead-letters`` with its reason, and must produce exactly the
outputs of the clean run.

The valid log itself holds odd-but-valid events too (unicode and integer IDs, nested,
null and list attributes, huge numbers, 64 KiB-sized context) so the state stores,
features and outputs are exercised with them in both runs.

Micro-batches: the flow's item is a micro-batch of raw lines and a few things happen
once per batch (MF steps, snapshot polling), so the mixed run keeps the clean run's
batches of valid events: the clean run reads batches of 200 lines, the mixed one
batches of 300 in which the 100 hostile lines sit at random slots between the same
200 valid ones, in their order (`docs/architecture.md`, "Micro-batches").
"""

from __future__ import annotations

import pickle
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.model import (
    MAX_DEPTH,
    MAX_RAW_IN_DEAD_LETTER,
    MAX_TS_MS,
    EventParser,
    event_to_dict,
)
from events.simulator import SimConfig, write_log
from flows.evaluate import read_jsonl
from flows.recsys import build

pytestmark = pytest.mark.slow

VALID_EVENTS = 20_000
HOSTILE = 10_000
BATCH = 200
HOSTILE_PER_BATCH = 100
MAX_BYTES = 65_536

REASONS = {"oversized", "malformed_json", "too_deep", "not_object", "missing_field",
           "unknown_type", "bad_ts", "absurd_ts", "ts_seconds", "ts_ahead", "wrong_type",
           "invalid_value"}
"""Every dead-letter reason of docs/events.md."""

REQUIRED_IDS = {"impression": ("impression_id", "user_id", "item_id"),
                "feedback": ("user_id", "item_id"), "request": ("request_id", "user_id"),
                "item": ("item_id",), "user": ("user_id",)}

Mutation = tuple[bytes, str]


def _nest(levels: int) -> bytes:
    """``levels`` nested JSON arrays/objects (alternating), as bytes."""
    opens = b"".join(b"[" if i % 2 else b'{"k":' for i in range(levels))
    closes = b"".join(b"]" if i % 2 else b"}" for i in reversed(range(levels)))
    return opens + b"0" + closes


class Fuzzer:
    """Seeded mutations of valid events; each returns (line, expected reason)."""

    def __init__(self, events: list[dict[str, Any]], seed: int) -> None:
        self.events = events
        self.rng = random.Random(seed)
        self.kinds: list[Callable[[dict[str, Any]], Mutation]] = [
            self.truncated, self.wrong_id_type, self.wrong_ts_type, self.huge_id,
            self.oversized, self.deep, self.very_deep, self.non_finite, self.invalid_utf8,
            self.lone_surrogate, self.absurd_ts, self.seconds_ts, self.future_ts, self.unknown_type,
            self.missing_type, self.not_object, self.missing_field, self.invalid_value,
            self.garbage, self.duplicate_key, self.wrong_container,
        ]

    def __call__(self) -> Mutation:
        event = self.rng.choice(self.events)
        kind = self.rng.choice(self.kinds)
        line, reason = kind(dict(event))
        assert b"\n" not in line and b"\r" not in line and line.strip(), (kind, line)
        if len(line) > MAX_BYTES:  # the parser checks the size first (a big event made deep)
            reason = "oversized"
        return line, reason

    # -- the mutations ------------------------------------------------------------------
    def truncated(self, ev: dict[str, Any]) -> Mutation:
        line = orjson.dumps(ev)
        return line[: self.rng.randrange(1, len(line))], "malformed_json"

    def wrong_id_type(self, ev: dict[str, Any]) -> Mutation:
        ev[self.rng.choice(REQUIRED_IDS[ev["type"]])] = self.rng.choice(
            [[1], {"id": "x"}, 1.5, True, False, -0.0])
        return orjson.dumps(ev), "wrong_type"

    def wrong_ts_type(self, ev: dict[str, Any]) -> Mutation:
        ev["ts"] = self.rng.choice(["2026-01-01", float(ev["ts"]), True, [ev["ts"]], {"ms": 1}])
        return orjson.dumps(ev), "bad_ts"

    def huge_id(self, ev: dict[str, Any]) -> Mutation:
        ev[self.rng.choice(REQUIRED_IDS[ev["type"]])] = "x" * self.rng.randrange(257, 20_000)
        return orjson.dumps(ev), "invalid_value"

    def oversized(self, ev: dict[str, Any]) -> Mutation:
        ev["context"] = {"blob": "y" * self.rng.randrange(MAX_BYTES, 2 * MAX_BYTES)}
        return orjson.dumps(ev), "oversized"

    def deep(self, ev: dict[str, Any]) -> Mutation:
        """Nested beyond MAX_DEPTH (the event is level 1, context level 2)."""
        levels = self.rng.randrange(MAX_DEPTH, 1000)  # deepest level: levels + 1
        return orjson.dumps(ev)[:-1] + b',"extra":' + _nest(levels) + b"}", "too_deep"

    def very_deep(self, ev: dict[str, Any]) -> Mutation:
        """Beyond orjson's own parse limit (1024)."""
        body = orjson.dumps(ev)[:-1]
        return body + b',"attrs":' + _nest(self.rng.randrange(1100, 5000)) + b"}", "too_deep"

    def non_finite(self, ev: dict[str, Any]) -> Mutation:
        token = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"nan"])
        field = self.rng.choice(["ts", "value", "position", "k"])
        body = orjson.dumps({k: v for k, v in ev.items() if k != field})[:-1]
        return body + b',"' + field.encode() + b'":' + token + b"}", "malformed_json"

    def invalid_utf8(self, ev: dict[str, Any]) -> Mutation:
        field = self.rng.choice(REQUIRED_IDS[ev["type"]])
        ev[field] = "MARK"
        bad = bytes(self.rng.choice([0xC0, 0xC1, 0xF5, 0xF8, 0xFE, 0xFF])  # never UTF-8
                    for _ in range(self.rng.randrange(1, 4)))
        return orjson.dumps(ev).replace(b"MARK", b"u" + bad), "malformed_json"

    def lone_surrogate(self, ev: dict[str, Any]) -> Mutation:
        field = self.rng.choice(REQUIRED_IDS[ev["type"]])
        ev[field] = "MARK"
        return orjson.dumps(ev).replace(b"MARK", b"a\\ud800b"), "malformed_json"

    def absurd_ts(self, ev: dict[str, Any]) -> Mutation:
        ev["ts"] = self.rng.choice([-1, -(10**12), MAX_TS_MS + 1, 2**62, 2**63 - 1, 2**64 - 1])
        return orjson.dumps(ev), "absurd_ts"

    def seconds_ts(self, ev: dict[str, Any]) -> Mutation:
        """Epoch seconds (or anything before 1973) where milliseconds belong."""
        ev["ts"] = self.rng.choice([ev["ts"] // 1000, 0, 1, 99_999_999_999])
        return orjson.dumps(ev), "ts_seconds"

    def future_ts(self, ev: dict[str, Any]) -> Mutation:
        """Before 2100 but far ahead of the stream and the wall clock."""
        ev["ts"] = MAX_TS_MS - self.rng.randrange(0, 86_400_000)
        return orjson.dumps(ev), "ts_ahead"

    def unknown_type(self, ev: dict[str, Any]) -> Mutation:
        ev["type"] = self.rng.choice(["impresion", "IMPRESSION", "", "click", 42, 1.5, True,
                                      ["impression"], {"type": "impression"}, "x" * 5000])
        return orjson.dumps(ev), "unknown_type"

    def missing_type(self, ev: dict[str, Any]) -> Mutation:
        if self.rng.random() < 0.5:
            del ev["type"]
        else:
            ev["type"] = None
        return orjson.dumps(ev), "missing_field"

    def not_object(self, ev: dict[str, Any]) -> Mutation:
        return self.rng.choice([orjson.dumps([ev]), b'"text"', b"42", b"null", b"true",
                                b"[]", b"-0.5e3"]), "not_object"

    def missing_field(self, ev: dict[str, Any]) -> Mutation:
        field = self.rng.choice(["ts", *REQUIRED_IDS[ev["type"]]])
        if self.rng.random() < 0.5:
            del ev[field]
        else:
            ev[field] = None
        return orjson.dumps(ev), "missing_field"

    def invalid_value(self, ev: dict[str, Any]) -> Mutation:
        choices: list[tuple[str, Any]] = [(f, "") for f in REQUIRED_IDS[ev["type"]]]
        if ev["type"] == "impression":
            choices += [("position", -2), ("position", 10**9)]
        if ev["type"] == "request":
            choices += [("k", 0), ("k", 1001), ("k", -5)]
        field, value = self.rng.choice(choices)
        ev[field] = value
        return orjson.dumps(ev), "invalid_value"

    def garbage(self, ev: dict[str, Any]) -> Mutation:
        noise = bytes(self.rng.choice([b for b in range(256) if b not in (10, 13)])
                      for _ in range(self.rng.randrange(1, 300)))
        return b"\xff" + noise, "malformed_json"

    def duplicate_key(self, ev: dict[str, Any]) -> Mutation:
        """JSON with a repeated key: the last one wins (orjson), here a bogus type."""
        return orjson.dumps(ev)[:-1] + b',"type":"bogus"}', "unknown_type"

    def wrong_container(self, ev: dict[str, Any]) -> Mutation:
        field = "attrs" if ev["type"] in ("item", "user") else "context"
        ev[field] = self.rng.choice([[1, 2], "ctx", 7, True])
        return orjson.dumps(ev), "wrong_type"


def odd_but_valid(ts: int, n: int) -> list[dict[str, Any]]:
    """Valid events with unusual content, to be processed like any other."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        t = ts + i
        user = ["ü-ñ-😀", 12345678901234567890 % 10**12, "u" * 256, "x\u0000y", " "][i % 5]
        item = [f"ítem-{i}", i * 7, "a#b\"c", "i" * 256][i % 4]
        out += [
            {"type": "item", "ts": t, "item_id": item,
             "attrs": {"category": ["c1", "c2"][i % 2], "tags": ["a", 1, None, {"x": 1}],
                       "nested": {"a": {"b": [1, 2, {"c": 3}]}}, "price": 1.7e308,
                       "blank": None, "flag": True, "neg": -(2**63)},
             "available": i % 3 != 0},
            {"type": "user", "ts": t, "user_id": user,
             "attrs": {"age": 10**18, "langs": ["fr", "de"], "deep": _deep_dict(MAX_DEPTH - 3)}},
            {"type": "impression", "ts": t + 1, "impression_id": f"odd-{i}", "user_id": user,
             "item_id": item, "position": 100_000,
             "context": {"page": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "q": "z" * 60_000, "n": -1e-300}},
            {"type": "feedback", "ts": t + 2, "user_id": user, "item_id": item,
             "action": "a" * 64, "impression_id": f"odd-{i}", "value": 1e308},
            {"type": "feedback", "ts": t + 3, "user_id": user, "item_id": item, "action": "click",
             "impression_id": f"odd-{i}", "context": {"": {"": [[]]}}},
            {"type": "request", "ts": t + 4, "request_id": f"odd-r{i}", "user_id": user,
             "k": 1000, "exclude": [item, 0, "🙂"], "context": {"device": ["m", "w"]}},
        ]
    return out


def _deep_dict(levels: int) -> dict[str, Any]:
    inner: dict[str, Any] = {}
    for _ in range(levels - 1):
        inner = {"d": inner}
    return inner


def write_logs(tmp: Path) -> tuple[Path, Path, list[Mutation]]:
    """The valid log and the mixed log (same valid batches, hostile lines at random slots)."""
    sim = tmp / "sim.jsonl"
    write_log(sim, VALID_EVENTS - 60, seed=5, config=SimConfig(requests_per_s=2.0))
    valid = sim.read_bytes().splitlines()
    ts_mid = orjson.loads(valid[len(valid) // 2])["ts"]
    odd = [orjson.dumps(e) for e in odd_but_valid(ts_mid, 10)]
    valid = valid[: len(valid) // 2] + odd + valid[len(valid) // 2:]
    assert len(valid) == VALID_EVENTS
    fuzz = Fuzzer([orjson.loads(v) for v in valid[::7]], seed=9)
    rng = random.Random(11)
    mixed: list[bytes] = []
    hostile: list[Mutation] = []
    for start in range(0, len(valid), BATCH):
        bad = [fuzz() for _ in range(HOSTILE_PER_BATCH)]
        hostile += bad
        # Hostile lines at random slots; the valid lines keep their order.
        slots = set(rng.sample(range(BATCH + HOSTILE_PER_BATCH), HOSTILE_PER_BATCH))
        good, evil = iter(valid[start:start + BATCH]), iter(line for line, _ in bad)
        mixed += [next(evil) if i in slots else next(good)
                  for i in range(BATCH + HOSTILE_PER_BATCH)]
    assert len(hostile) == HOSTILE
    clean_log, mixed_log = tmp / "clean.jsonl", tmp / "mixed.jsonl"
    clean_log.write_bytes(b"\n".join(valid) + b"\n")
    mixed_log.write_bytes(b"\n".join(mixed) + b"\n")
    return clean_log, mixed_log, hostile


def run_flow(log: Path, out: Path, batch_size: int) -> dict[str, list[dict[str, Any]]]:
    """The real flow over ``log``: every output file, keyed by output name."""
    run_main(build({
        "inputs": [{"kind": "replay", "path": str(log), "batch_size": batch_size}],
        "output": {"dir": str(out)},
        # Deterministic: snapshots loaded at every micro-batch, a single-threaded HNSW build.
        "serving": {"poll_ms": 0},
        "index": {"threads": 1},
        "metrics": {"interval_s": 3600.0},
        "parse": {"max_bytes": MAX_BYTES},
    }))
    return {name: read_jsonl(out / f"{name}.jsonl")
            for name in ("examples", "late-labels", "recommendations", "snapshots",
                         "dead-letters", "metrics")}


def _without(records: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


def test_hostile_events_are_dead_letters_and_valid_ones_are_untouched(tmp_path: Path) -> None:
    clean_log, mixed_log, hostile = write_logs(tmp_path)
    clean = run_flow(clean_log, tmp_path / "clean", BATCH)
    mixed = run_flow(mixed_log, tmp_path / "mixed", BATCH + HOSTILE_PER_BATCH)

    # Every hostile line is a dead letter with its reason (raw kept, cut at 4 KiB).
    assert clean["dead-letters"] == []
    expected = Counter((line[:MAX_RAW_IN_DEAD_LETTER].decode("utf-8", "backslashreplace"), reason)
                       for line, reason in hostile)
    got = Counter((d["raw"], d["reason"]) for d in mixed["dead-letters"])
    assert got == expected
    assert {r for _, r in hostile} == REASONS, "the fuzzer covers every reason"
    for d in mixed["dead-letters"]:
        assert d["detail"] and isinstance(d["ingest_ts"], int)
        assert d.get("raw_truncated", False) == (d.get("raw_bytes", 0) > MAX_RAW_IN_DEAD_LETTER)

    # Every valid event is processed exactly as in the clean run.
    assert len(clean["examples"]) > 1000 and len(clean["recommendations"]) > 500
    assert any(e["example_id"].startswith("imp:odd-") for e in clean["examples"])
    for name in ("examples", "late-labels"):
        assert mixed[name] == clean[name], name
    assert (_without(mixed["recommendations"], "latency_ms")
            == _without(clean["recommendations"], "latency_ms"))
    assert _without(mixed["snapshots"], "created_ms") == _without(clean["snapshots"], "created_ms")

    [s_clean] = [m for m in clean["metrics"] if m["kind"] == "summary"]
    [s_mixed] = [m for m in mixed["metrics"] if m["kind"] == "summary"]
    for key in ("events_by_type", "outputs", "examples_by_label", "join", "tables"):
        assert s_mixed[key] == s_clean[key], key
    assert sum(s_clean["events_by_type"].values()) == s_clean["events_in"] == VALID_EVENTS
    assert s_mixed["events_in"] == VALID_EVENTS + HOSTILE  # raw inputs, dead letters included
    assert s_mixed["dead_letters"] == HOSTILE
    assert s_mixed["dead_by_reason"] == dict(Counter(r for _, r in hostile))


# -- the parser alone, under hypothesis ---------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)  # orjson-writable
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | _text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4),
    max_leaves=40,
)
_fields = st.fixed_dictionaries(
    {"type": st.sampled_from(["impression", "feedback", "request", "item", "user"]),
     "ts": st.integers(0, MAX_TS_MS) | _json},
    optional={name: _json | st.text("abc", max_size=300) for name in
              ("impression_id", "user_id", "item_id", "request_id", "action", "value",
               "position", "k", "context", "attrs", "exclude", "available")},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300) | _fields.map(orjson.dumps)
       | st.builds(lambda levels: b'{"type":"user","ts":1767225600000,"user_id":"u","attrs":'
                   + _nest(levels) + b"}", st.integers(1, 1500)))
def test_parser_never_raises_and_everything_it_accepts_can_be_written(raw: bytes) -> None:
    """Any bytes: a typed event whose dict can be written (orjson) and pickled, or a
    dead letter with a documented reason that can be written too."""
    out = EventParser(max_future_skew_ms=86_400_000, clock_ms=lambda: 1_767_225_600_000).parse(raw)
    if isinstance(out, dict):
        assert out["reason"] in REASONS, out
        orjson.dumps(out)
    else:
        as_dict = event_to_dict(out)
        orjson.loads(orjson.dumps({"example": {"context": as_dict}}))
        assert pickle.loads(pickle.dumps(out)) == out
