"""The real flow against the real broker: Kafka in, Kafka out, outputs checked exactly."""

from __future__ import annotations

import zlib

import orjson
import pytest
from bytewax.testing import run_main

from flows.recsys import build

pytestmark = pytest.mark.kafka

T0 = 1_767_225_600_000


def test_kafka_round_trip_through_the_flow(kafka_broker, kafka_produce, kafka_read_records) -> None:
    from flows.broker import create_topics

    bootstrap = kafka_broker.bootstrap
    app = "rt"
    create_topics(bootstrap, [f"{app}.events"], 2)
    good = []
    for n in range(40):
        good.append({"type": "impression", "ts": T0 + n, "impression_id": f"imp{n}",
                     "user_id": f"u{n % 7}", "item_id": f"i{n % 5}", "position": n % 3})
        if n % 4 == 0:
            good.append({"type": "feedback", "ts": T0 + n + 100, "user_id": f"u{n % 7}",
                         "item_id": f"i{n % 5}", "action": "click", "impression_id": f"imp{n}"})
    bad = [b"{not json", b"[]", orjson.dumps({"type": "nope", "ts": T0}),
           orjson.dumps({"type": "impression", "ts": T0, "user_id": "u1", "item_id": "a"}),
           orjson.dumps({"type": "user", "ts": -5, "user_id": "u1"})]
    values = [orjson.dumps(e) for e in good] + bad
    keys = [str(e["user_id"]).encode() for e in good] + [None] * len(bad)
    # Keep each user's events in one partition, as a keyed producer would.
    kafka_produce(bootstrap, f"{app}.events", values, keys=keys,
                  partition=lambda i: (zlib.crc32(keys[i]) % 2) if keys[i] else 1)

    flow = build({
        "app": app,
        "kafka": {"bootstrap": bootstrap},
        "inputs": [{"kind": "kafka", "topics": ["events"], "tail": False, "batch_size": 16}],
        "output": {"kind": "kafka"},
        "shards": {"users": 3},
        "sampler": {"negative_rate": 1.0},
    })
    run_main(flow)

    dead = kafka_read_records(bootstrap, f"{app}.dead-letters", expected=len(bad))
    assert sorted((orjson.loads(r.value)["raw"].encode(), orjson.loads(r.value)["reason"])
                  for r in dead) == sorted(zip(bad, ["malformed_json", "not_object", "unknown_type",
                                                     "missing_field", "absurd_ts"], strict=True))
    examples = [orjson.loads(r.value) for r in
                kafka_read_records(bootstrap, f"{app}.examples", expected=40)]
    assert sorted((e["example_id"], e["label"]) for e in examples) == sorted(
        (f"imp:imp{n}", int(n % 4 == 0)) for n in range(40))
    records = kafka_read_records(bootstrap, f"{app}.examples", expected=40)
    assert all(r.key == orjson.loads(r.value)["user_id"].encode() for r in records)
    metrics = [orjson.loads(r.value) for r in kafka_read_records(bootstrap, f"{app}.metrics")]
    [summary] = [m for m in metrics if m["kind"] == "summary"]
    assert summary["events_in"] == len(values)
