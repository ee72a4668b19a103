"""The local Tansu broker alone: does its cost per fetch grow with what it stores?

``bench/latency.py``'s round trip grows through a 70 s run at a constant traffic while
the local broker's CPU grows with it. This bench runs the broker (``flows.broker``,
``memory://``) without the flow:

* ``stored``: for each stored batch count N (``--stored``), a fresh broker holding N
  record batches of ``--records-per-batch`` records in one partition, then
  ``--rounds`` rounds of (produce one record, flush, consume it at the tail):
  ``broker_cpu_ms_per_round`` (the broker process's CPU, ``/proc``) and
  ``wall_ms_per_round``. A broker whose fetch finds the offset through an index (Kafka)
  costs the same at any N; this build's ``memory://`` storage lists every stored batch
  of the partition on each fetch that returns records, so the cost grows by ~0.7 us per
  stored batch (measured 0.9 ms at N = 100, 12.2 ms at N = 16,000, load 5-8), with the
  batch count, not the record count (800 batches of 400 records: 0.9 ms).
* ``--traffic S``: ``bench/latency.py``'s live traffic for S seconds without the flow:
  the client sends every 10 ms what is due of ``--events-per-s`` events and 100
  requests/s into ``latbench.events`` (one flush per tick, as the bench's client), an
  echo thread reads them (``fetch_max_wait_ms`` 10, as the flow's source) and answers
  each request into ``latbench.recommendations``, a receiver thread reads the answers;
  ``by_window`` per 10 s: the round trip p50 / p99 and the broker's and this process's
  CPU per second. ``--rotate`` adds the control: the same traffic with each 10 s
  window's events and answers in a partition of their own (both consumers read every
  partition), so no fetched partition stores more than 10 s of batches.
* ``retention``: whether the broker honours a topic's ``retention.ms`` /
  ``retention.bytes`` / ``segment.bytes``: the partition's first offset after
  ``retention.ms`` has passed (0: nothing was deleted) and what DescribeConfigs answers.
  (DeleteRecords is not tried: this build answers it by a panic, ``not yet
  implemented``, that drops the connection.)

Usage: ``python bench/broker_growth.py [--stored 100,2000,8000,16000]
[--records-per-batch 20] [--rounds 400] [--traffic 70] [--rotate] [--events-per-s 2000]``.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from typing import Any

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from latency import APP, WINDOW_S, by_window, cpu_mark

from flows.broker import LocalBroker, create_topics

VALUE = b"e" * 160
"""A record's value (bytes), about the size of a simulated event."""


def stored_batch_cost(n_batches: int, records_per_batch: int, rounds: int) -> dict[str, Any]:
    """Broker CPU and wall ms per (produce one record, flush, consume it) round with
    ``n_batches`` batches of ``records_per_batch`` records already in the partition."""
    with LocalBroker() as broker:
        create_topics(broker.bootstrap, "stored")
        tp = TopicPartition("stored", 0)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks=1,
                                 batch_size=1 << 20)  # a flush's records in one batch
        for _ in range(n_batches):  # one flush, one batch
            for _ in range(records_per_batch):
                producer.send(tp.topic, value=VALUE)
            producer.flush()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                 fetch_max_wait_ms=10)
        consumer.assign([tp])
        consumer.seek(tp, n_batches * records_per_batch)
        got = 0
        _, cpu0 = cpu_mark(0.0, {"broker": [broker.pid or 0]})
        start = time.monotonic()
        for _ in range(rounds):
            producer.send(tp.topic, value=VALUE)
            producer.flush()
            records: list[Any] = []
            while not records:
                records = consumer.poll(timeout_ms=50).get(tp, [])
            got += len(records)
        wall, cpu1 = cpu_mark(time.monotonic() - start, {"broker": [broker.pid or 0]})
        producer.close()
        consumer.close()
    return {"stored_batches": n_batches, "records_per_batch": records_per_batch,
            "rounds": rounds, "consumed": got,
            "broker_cpu_ms_per_round": round(1e3 * (cpu1["broker"] - cpu0["broker"]) / rounds, 3),
            "wall_ms_per_round": round(1e3 * wall / rounds, 3)}


def retention(wait_s: float = 3.0) -> dict[str, Any]:
    """A topic created with ``retention.ms`` 1000 (and small ``retention.bytes`` /
    ``segment.bytes``) and 200 batches: its first offset ``wait_s`` later and the topic
    configuration DescribeConfigs reports."""
    settings = {"retention.ms": "1000", "retention.bytes": "10000", "segment.bytes": "10000"}
    with LocalBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            admin.create_topics([NewTopic("kept", 1, 1, topic_configs=settings)])
            create_topics(broker.bootstrap, "kept")
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
            for _ in range(200):
                producer.send("kept", value=VALUE)
                producer.flush()
            producer.close()
            time.sleep(wait_s)
            described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "kept")])
        finally:
            admin.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        tp = TopicPartition("kept", 0)
        first = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        consumer.close()
    return {"topic_configs_set": settings, "first_offset": first, "end_offset": end,
            "described": repr(described)[:300]}


class Echo(threading.Thread):
    """Reads ``partitions`` of ``topic`` from their start (``fetch_max_wait_ms`` 10, polls
    of 10 ms, up to 1,000 records) and passes each request (value starting ``b"r"``) and
    its partition to ``answer``."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, answer: Any) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      fetch_max_wait_ms=10)
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(tps)
        for tp in tps:
            self.consumer.seek(tp, 0)
        self.answer = answer
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for tp, records in self.consumer.poll(timeout_ms=10, max_records=1000).items():
                for rec in records:
                    if rec.value[:1] == b"r":
                        self.answer(rec.value, tp.partition)
        self.consumer.close()


def traffic(seconds: float, events_per_s: float, requests_per_s: float = 100.0,
            rotate: bool = False) -> list[dict[str, Any]]:
    """``bench/latency.py``'s live traffic through the broker with an echo in place of
    the flow; ``by_window`` of the round trips with the broker's and this process's
    CPU per second. ``rotate``: the control: each ``WINDOW_S`` window's traffic goes to
    a partition of its own (events and answers), so no fetched partition stores more
    than one window's batches; same rates, same consumers."""
    events, answers = f"{APP}.events", f"{APP}.recommendations"
    partitions = int(seconds // WINDOW_S) + 1 if rotate else 1
    with LocalBroker() as broker:
        create_topics(broker.bootstrap, [events, answers], partitions)
        replier = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks="all")
        received: dict[str, tuple[float, float]] = {}
        echo = Echo(broker.bootstrap, events, partitions,
                    lambda v, p: replier.send(answers, value=v, partition=p))
        receiver = Echo(broker.bootstrap, answers, partitions,
                        lambda v, p: received.__setitem__(v.decode(), (time.time(), 0.0)))
        echo.start()
        receiver.start()
        client = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, acks=1)
        pids = {"broker": [broker.pid or 0], "client": [os.getpid()]}
        sent: dict[str, float] = {}
        n_ev = n_req = 0
        start = time.monotonic()
        marks = [cpu_mark(0.0, pids)]
        while (elapsed := time.monotonic() - start) < seconds:
            if elapsed >= WINDOW_S * len(marks):
                marks.append(cpu_mark(elapsed, pids))
            partition = len(marks) - 1 if rotate else 0
            while n_ev < int(elapsed * events_per_s) + 1:
                client.send(events, value=VALUE, partition=partition)
                n_ev += 1
            while n_req < int(elapsed * requests_per_s) + 1:
                rid = f"r{n_req}"
                sent[rid] = time.time()
                client.send(events, value=rid.encode(), partition=partition)
                n_req += 1
            client.flush()
            time.sleep(max(0.0, start + elapsed + 0.01 - time.monotonic()))
        marks.append(cpu_mark(time.monotonic() - start, pids))
        deadline = time.monotonic() + 10
        while len(received) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.1)
        for thread in (echo, receiver):
            thread.stop.set()
            thread.join(timeout=5)
        client.close()
        replier.close()
    return [{k: v for k, v in row.items() if not k.startswith("inflow")}  # no flow here
            for row in by_window(sent, received, marks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", default="100,2000,8000,16000",
                        help="stored batch counts, comma-separated ('' for none)")
    parser.add_argument("--records-per-batch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--traffic", type=float, default=0.0, metavar="S",
                        help="also run the live traffic without the flow for S seconds")
    parser.add_argument("--events-per-s", type=float, default=2_000.0)
    parser.add_argument("--rotate", action="store_true",
                        help="with --traffic, also run the control: each 10 s window's "
                             "traffic in a partition of its own (the stored log per "
                             "fetched partition bounded)")
    args = parser.parse_args()
    figures: dict[str, Any] = {"stored": []}
    for n in (int(x) for x in args.stored.split(",") if x):
        row = stored_batch_cost(n, args.records_per_batch, args.rounds)
        print(orjson.dumps(row).decode(), flush=True)
        figures["stored"].append(row)
    figures["retention"] = retention()
    print(orjson.dumps(figures["retention"]).decode(), flush=True)
    if args.traffic:
        figures["traffic"] = traffic(args.traffic, args.events_per_s)
        for row in figures["traffic"]:
            print(orjson.dumps(row).decode(), flush=True)
    if args.traffic and args.rotate:
        figures["traffic_rotated"] = traffic(args.traffic, args.events_per_s, rotate=True)
        for row in figures["traffic_rotated"]:
            print("rotated", orjson.dumps(row).decode(), flush=True)
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
