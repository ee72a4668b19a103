"""Kafka sink for Bytewax 0.21 built on kafka-python.

:class:`KafkaSink` is a :class:`~bytewax.outputs.FixedPartitionedSink` (one partition
per sink) whose items are ``(key, list[dict])`` batches of output records, sent as
orjson with key ``user_id``. ``write_batch`` hands the records to the producer and
returns (its sender thread delivers them at once: ``linger_ms`` 0); the partition's
``snapshot``, which Bytewax calls at the end of every epoch (with or without
recovery), waits until every record sent is acknowledged, so when an epoch completes
all its output is on the broker (at-least-once together with Bytewax recovery) while
a micro-batch never waits for a broker round trip. More than ``max_in_flight``
unacknowledged records make ``write_batch`` wait too (bounded memory). Broker failures
are retried with capped exponential backoff and a warning each; no record is dropped.
``producer_config`` is passed to kafka-python unchanged (security settings go there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from kafka import KafkaProducer
from kafka import errors as kerr

from operators.kafka_io import (
    FATAL_CONFIG_ERRORS,
    FATAL_RECORD_ERRORS,
    Backoff,
    bootstrap_list,
)
from operators.kafka_logs import waiting_for

logger = logging.getLogger(__name__)

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode_record(record: Mapping[str, Any]) -> tuple[bytes | None, bytes]:
    """Kafka (key, value) for an output record: value = orjson of the record (numpy
    scalars/arrays allowed), key = ``user_id`` as UTF-8 or None when absent."""
    user_id = record.get("user_id")
    if user_id is None:
        key = None
    elif isinstance(user_id, bytes):
        key = user_id
    else:
        key = str(user_id).encode("utf-8")
    return key, orjson.dumps(record, option=_ORJSON_OPTS)


class _KafkaSinkPartition(StatefulSinkPartition[list[dict[str, Any]], None]):
    """One producer per partition; records are acknowledged by the epoch's snapshot
    (or once ``max_in_flight`` are waiting)."""

    def __init__(
        self,
        topic: str,
        producer_config: dict[str, Any],
        flush_timeout_s: float,
        backoff: Backoff,
        max_in_flight: int = 20_000,
    ) -> None:
        self._topic = topic
        self._config = producer_config
        self._flush_timeout_s = flush_timeout_s
        self._backoff = backoff
        self._max_in_flight = max_in_flight
        self._producer: KafkaProducer | None = None
        self._in_flight: list[tuple[tuple[bytes | None, bytes], Any]] = []
        """Records handed to the producer and not yet acknowledged, with their futures."""
        self._unsent: list[tuple[bytes | None, bytes]] = []
        """Records the producer did not take (retried by the next ``settle``)."""

    @property
    def in_flight(self) -> int:
        """Records sent and not yet known to be acknowledged, plus records to re-send."""
        return len(self._in_flight) + len(self._unsent)

    def write_batch(self, items: list[list[dict[str, Any]]]) -> None:
        """Hand every record of every batch to the producer; wait for acknowledgements
        only when more than ``max_in_flight`` records are waiting (``snapshot`` waits
        for the rest)."""
        records: list[tuple[bytes | None, bytes]] = []
        for item in items:
            if isinstance(item, Mapping):  # tolerate single records
                records.append(encode_record(item))
            else:
                records.extend(encode_record(rec) for rec in item)
        if self._unsent:  # the broker was unreachable: keep the order of what is pending
            self._unsent.extend(records)
        else:
            self._unsent = self._send(records)
        if self.in_flight > self._max_in_flight:
            self.settle()

    def snapshot(self) -> None:
        """End of an epoch: block until every record written so far is acknowledged."""
        self.settle()

    def settle(self) -> None:
        """Block until every record handed over is acknowledged (re-sending failed and
        unsent ones with backoff and a warning each time).

        Records already acknowledged are never re-sent, records whose send failed are
        re-sent (their order relative to the rest may change).
        """
        if not self._in_flight and not self._unsent:
            return
        with waiting_for(f"acknowledgements of records to {self._topic}",
                         self._config.get("bootstrap_servers", [])):
            while True:
                pending = self._collect() + self._unsent
                self._unsent = []
                if not pending:
                    break
                delay = self._backoff.next_delay()
                logger.warning("KafkaSink(%s): %d records not acknowledged; retrying in "
                               "%.1f s", self._topic, len(pending), delay)
                time.sleep(delay)
                self._unsent = self._send(pending)
        self._backoff.reset()

    def _send(self, records: list[tuple[bytes | None, bytes]]
              ) -> list[tuple[bytes | None, bytes]]:
        """Hand ``records`` to the producer (futures kept in ``_in_flight``); returns those
        it did not take."""
        if not records:
            return []
        try:
            producer = self._ensure_producer()
        except FATAL_CONFIG_ERRORS:
            raise
        except (kerr.KafkaError, OSError) as exc:
            logger.warning("KafkaSink(%s): cannot create producer: %s: %s",
                           self._topic, type(exc).__name__, exc)
            return records
        for i, (key, value) in enumerate(records):
            try:
                fut = producer.send(self._topic, key=key, value=value)
            except FATAL_RECORD_ERRORS + FATAL_CONFIG_ERRORS:
                raise
            except (kerr.KafkaError, OSError) as exc:
                logger.warning("KafkaSink(%s): send failed: %s: %s", self._topic,
                               type(exc).__name__, exc)
                return records[i:]
            self._in_flight.append(((key, value), fut))
        return []

    def _collect(self) -> list[tuple[bytes | None, bytes]]:
        """Wait for every in-flight record; returns the ones that must be re-sent."""
        in_flight = self._in_flight  # counted in ``in_flight`` until settled
        if not in_flight:
            return []
        producer = self._producer
        # Wait for everything handed to the producer (it retries internally until
        # delivery_timeout_ms); never re-send a record whose future is still open.
        while producer is not None:
            try:
                producer.flush(timeout=self._flush_timeout_s)
                break
            except kerr.KafkaTimeoutError:
                open_count = sum(1 for _, f in in_flight if not f.is_done)
                if open_count == 0:
                    break
                logger.warning("KafkaSink(%s): still waiting for %d of %d records "
                               "(broker unreachable?)", self._topic, open_count,
                               len(in_flight))
        self._in_flight = []
        failed: list[tuple[bytes | None, bytes]] = []
        for rec, fut in in_flight:
            if fut.is_done and fut.succeeded():
                continue
            exc = fut.exception
            if isinstance(exc, FATAL_RECORD_ERRORS):
                raise exc
            failed.append(rec)
        if failed:
            logger.warning("KafkaSink(%s): %d records failed: %s", self._topic, len(failed),
                           next((f.exception for _, f in in_flight if f.failed()), None))
            # The producer may be stuck in a fatal state (e.g. its idempotent producer
            # id is unknown to a restarted broker): start the retry with a fresh one.
            self._close_producer(timeout_s=1.0)
        return failed

    def _ensure_producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**self._config)
        return self._producer

    def _close_producer(self, timeout_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - closing a broken client
                logger.debug("error closing producer: %s", exc)

    def close(self) -> None:
        """Flush (bounded) and close the producer (Bytewax snapshots the partition at the
        end of the last epoch first, so everything written is acknowledged by then)."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self._flush_timeout_s)
            except kerr.KafkaError as exc:
                logger.warning("KafkaSink(%s): flush on close failed: %s", self._topic, exc)
        self._close_producer(timeout_s=self._flush_timeout_s)


class KafkaSink(FixedPartitionedSink[list[dict[str, Any]], None]):
    """Write batches of output records to a Kafka topic.

    Items are ``(key, list[dict])`` (any key: one partition per sink; a single
    ``dict`` is accepted as a one-record batch). Each record becomes one message: value
    = orjson bytes of the record, key = ``record["user_id"]`` UTF-8 when present, else
    None. ``write_batch`` hands everything to the producer and returns; the partition's
    epoch-end ``snapshot`` checks every acknowledgement, so when a Bytewax epoch
    completes all its output is on the broker (at-least-once with recovery). Broker
    outages block the epoch's end (and ``write_batch`` beyond ``max_in_flight``
    records: backpressure) with a warning per retry.

    Args:
        bootstrap: ``"host:port[,host:port]"`` or a list of them.
        topic: Output topic.
        producer_config: Extra ``KafkaProducer`` settings, passed through (security,
            ``linger_ms``, ``compression_type``, ...).
        flush_timeout_s: Seconds per flush wait before logging a warning and waiting
            again.
        backoff_initial_s: First retry delay after failed sends, seconds.
        backoff_max_s: Cap of the exponential retry delay, seconds.
        max_in_flight: Unacknowledged records after which ``write_batch`` waits for
            acknowledgements itself.
    """

    def __init__(
        self,
        bootstrap: str | list[str],
        topic: str,
        producer_config: Mapping[str, Any] | None = None,
        *,
        flush_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_in_flight: int = 20_000,
    ) -> None:
        self.bootstrap = bootstrap_list(bootstrap)
        self.topic = topic
        self.producer_config = dict(producer_config or {})
        self.flush_timeout_s = flush_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_in_flight = max_in_flight

    def _kafka_config(self) -> dict[str, Any]:
        """Effective KafkaProducer settings (defaults < producer_config)."""
        cfg: dict[str, Any] = {
            "acks": "all",
            # The batch does not wait for acknowledgements, so the sender thread is
            # what delivers: send at once (records still batch while the worker holds
            # the GIL). bench/latency.py: linger 5 ms added ~9 ms to the round trip p50.
            "linger_ms": 0,
            # Fail fast (then retry with our backoff and a warning) instead of
            # blocking silently for kafka-python's defaults (30 s / 60 s).
            "bootstrap_timeout_ms": 5000,
            "max_block_ms": 10_000,
            "reconnect_backoff_max_ms": 1000,
            # kafka-python's idempotent producer (its default since 2.1) lost records
            # that were in flight when the broker restarted: their futures succeeded
            # but the records were not on the broker afterwards (Tansu; 30-60 of
            # ~10,000 over three restarts, tests/reliability/test_broker_outage.py).
            # Without idempotence a retry may write a record twice instead, which
            # at-least-once delivery with deterministic ids allows.
            "enable_idempotence": False,
        }
        cfg.update(self.producer_config)
        cfg["bootstrap_servers"] = self.bootstrap
        return cfg

    def list_parts(self) -> list[str]:
        """One partition, named apart from the topic: its (empty) recovery state stays
        valid when a resumed flow writes to another topic."""
        return ["kafka"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None
                   ) -> _KafkaSinkPartition:
        """One producer for the topic (its acknowledgements awaited at every epoch end)."""
        return _KafkaSinkPartition(
            topic=self.topic,
            producer_config=self._kafka_config(),
            flush_timeout_s=self.flush_timeout_s,
            backoff=Backoff(self.backoff_initial_s, self.backoff_max_s),
            max_in_flight=self.max_in_flight,
        )
