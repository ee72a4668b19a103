"""Kafka sink for Bytewax 0.21 built on kafka-python.

:class:`KafkaSink` is a :class:`~bytewax.outputs.DynamicSink` whose items are
``list[dict]`` batches of output records, sent as orjson with key ``user_id``; every
``write_batch`` is flushed and acknowledged before it returns (at-least-once together
with Bytewax recovery). Broker failures are retried with capped exponential backoff and
a warning each; no record is dropped. ``producer_config`` is passed to kafka-python
unchanged (security settings go there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition
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


class _KafkaSinkPartition(StatelessSinkPartition[list[dict[str, Any]]]):
    """One producer per worker; every write_batch is acknowledged before returning."""

    def __init__(
        self,
        topic: str,
        producer_config: dict[str, Any],
        flush_timeout_s: float,
        backoff: Backoff,
    ) -> None:
        self._topic = topic
        self._config = producer_config
        self._flush_timeout_s = flush_timeout_s
        self._backoff = backoff
        self._producer: KafkaProducer | None = None

    def write_batch(self, items: list[list[dict[str, Any]]]) -> None:
        """Send every record of every batch and block until all are acknowledged.

        Broker errors are retried with backoff (a warning each time); records already
        acknowledged are never re-sent, records whose send failed are re-sent (their
        order relative to the rest of the batch may change).
        """
        with waiting_for(f"acknowledgements of records to {self._topic}",
                         self._config.get("bootstrap_servers", [])):
            self._write_batch(items)

    def _write_batch(self, items: list[list[dict[str, Any]]]) -> None:
        pending: list[tuple[bytes | None, bytes]] = []
        for item in items:
            if isinstance(item, Mapping):  # tolerate single records
                pending.append(encode_record(item))
            else:
                pending.extend(encode_record(rec) for rec in item)
        while pending:
            pending = self._send_round(pending)
            if pending:
                delay = self._backoff.next_delay()
                logger.warning("KafkaSink(%s): %d records not acknowledged; retrying in "
                               "%.1f s", self._topic, len(pending), delay)
                time.sleep(delay)
        self._backoff.reset()

    def _send_round(
        self, records: list[tuple[bytes | None, bytes]]
    ) -> list[tuple[bytes | None, bytes]]:
        """Send ``records`` once and wait for them; return those that must be retried."""
        try:
            producer = self._ensure_producer()
        except FATAL_CONFIG_ERRORS:
            raise
        except (kerr.KafkaError, OSError) as exc:
            logger.warning("KafkaSink(%s): cannot create producer: %s: %s",
                           self._topic, type(exc).__name__, exc)
            return records
        in_flight: list[tuple[tuple[bytes | None, bytes], Any]] = []
        unsent: list[tuple[bytes | None, bytes]] = []
        for i, (key, value) in enumerate(records):
            try:
                fut = producer.send(self._topic, key=key, value=value)
            except FATAL_RECORD_ERRORS + FATAL_CONFIG_ERRORS:
                raise
            except (kerr.KafkaError, OSError) as exc:
                logger.warning("KafkaSink(%s): send failed: %s: %s", self._topic,
                               type(exc).__name__, exc)
                unsent = records[i:]
                break
            in_flight.append(((key, value), fut))
        # Wait for everything handed to the producer (it retries internally until
        # delivery_timeout_ms); never re-send a record whose future is still open.
        while True:
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
        if failed or unsent:
            # The producer may be stuck in a fatal state (e.g. its idempotent producer
            # id is unknown to a restarted broker): start the retry with a fresh one.
            self._close_producer(timeout_s=1.0)
        return failed + unsent

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
        """Flush (bounded) and close the producer."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self._flush_timeout_s)
            except kerr.KafkaError as exc:
                logger.warning("KafkaSink(%s): flush on close failed: %s", self._topic, exc)
        self._close_producer(timeout_s=self._flush_timeout_s)


class KafkaSink(DynamicSink[list[dict[str, Any]]]):
    """Write batches of output records to a Kafka topic.

    Items are ``list[dict]`` (a single ``dict`` is accepted as a one-record batch).
    Each record becomes one message: value = orjson bytes of the record, key =
    ``record["user_id"]`` UTF-8 when present, else None. ``write_batch`` sends
    everything, then flushes and checks every acknowledgement, so when a Bytewax
    epoch completes all its output is on the broker (at-least-once with recovery).
    Broker outages block the writer (backpressure) with a warning per retry.

    Args:
        bootstrap: ``"host:port[,host:port]"`` or a list of them.
        topic: Output topic.
        producer_config: Extra ``KafkaProducer`` settings, passed through (security,
            ``linger_ms``, ``compression_type``, ...).
        flush_timeout_s: Seconds per flush wait before logging a warning and waiting
            again.
        backoff_initial_s: First retry delay after failed sends, seconds.
        backoff_max_s: Cap of the exponential retry delay, seconds.
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
    ) -> None:
        self.bootstrap = bootstrap_list(bootstrap)
        self.topic = topic
        self.producer_config = dict(producer_config or {})
        self.flush_timeout_s = flush_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s

    def _kafka_config(self) -> dict[str, Any]:
        """Effective KafkaProducer settings (defaults < producer_config)."""
        cfg: dict[str, Any] = {
            "acks": "all",
            "linger_ms": 5,
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

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _KafkaSinkPartition:
        """One producer per worker."""
        return _KafkaSinkPartition(
            topic=self.topic,
            producer_config=self._kafka_config(),
            flush_timeout_s=self.flush_timeout_s,
            backoff=Backoff(self.backoff_initial_s, self.backoff_max_s),
        )
