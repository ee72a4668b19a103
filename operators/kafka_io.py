"""Kafka source for Bytewax 0.21 built on kafka-python (the sink: operators/kafka_sink.py).

Bytewax's own Kafka connector needs confluent-kafka; this project uses kafka-python,
so it brings its own:

* :class:`KafkaSource` — a :class:`~bytewax.inputs.FixedPartitionedSource` with one
  Bytewax partition per Kafka topic-partition (part key ``"topic#3"``). Each emitted
  item is a *micro-batch*: ``list[bytes]`` of message values (the flow processes
  micro-batches, never single messages). The resume state is the next offset to read,
  so offsets live in Bytewax's recovery snapshots (no consumer group, no commits).
* :class:`~operators.kafka_sink.KafkaSink` (its own module) — the sink.

Both retry broker failures with capped exponential backoff and log a warning for each
failure; neither drops data. ``consumer_config`` / ``producer_config`` are passed to
kafka-python unchanged (security settings such as ``security_protocol``,
``sasl_mechanism``, ``ssl_cafile`` go there).

Notes on the local Tansu broker (``flows.broker``): its ListOffsets answer for
"latest" is the base offset of the last record batch + 1 (it under-reports when the
last batch holds several records), so this module never relies on
``end_offsets``/``seek_to_end`` for correctness; it uses the high watermark carried by
Fetch responses (``KafkaConsumer.highwater``), which is exact.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from kafka import KafkaConsumer, TopicPartition
from kafka import errors as kerr

from operators.kafka_logs import waiting_for

logger = logging.getLogger(__name__)

StartFrom = Literal["earliest", "latest"]
OnLostOffset = Literal["earliest", "latest", "stop"]
"""What a partition does when its saved offset is not on the broker."""


class OffsetLostError(RuntimeError):
    """A saved offset is not on the broker and the policy is ``stop``."""


# Errors that retrying cannot fix: raise instead of looping forever.
FATAL_CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    kerr.KafkaConfigurationError,
    kerr.IllegalStateError,
)
FATAL_RECORD_ERRORS: tuple[type[BaseException], ...] = (kerr.MessageSizeTooLargeError,)


def part_key(topic: str, partition: int) -> str:
    """Bytewax partition key for a Kafka topic-partition: ``"topic#partition"``."""
    return f"{topic}#{partition}"


def parse_part_key(key: str) -> TopicPartition:
    """Inverse of :func:`part_key` (Kafka topic names cannot contain ``#``)."""
    topic, _, partition = key.rpartition("#")
    if not topic or not partition.isdigit():
        raise ValueError(f"not a Kafka part key: {key!r} (expected 'topic#N')")
    return TopicPartition(topic, int(partition))


class OffsetBatch(list):
    """A micro-batch of message values carrying its partition's read position:
    ``offsets = {"topic#p": (next offset, end offset)}``, the end being the high
    watermark of the last Fetch response; the metrics stage reports ``end - next`` as the
    consumer lag of the partition."""

    def __init__(self, values: list[bytes], offsets: dict[str, tuple[int, int]]) -> None:
        super().__init__(values)
        self.offsets = offsets


@dataclass
class Backoff:
    """Capped exponential backoff, in seconds."""

    initial_s: float = 0.1
    max_s: float = 5.0
    current_s: float = 0.0

    def next_delay(self) -> float:
        """Advance and return the delay before the next attempt (seconds)."""
        self.current_s = (
            self.initial_s if self.current_s <= 0 else min(self.current_s * 2, self.max_s)
        )
        return self.current_s

    def reset(self) -> None:
        """Forget past failures."""
        self.current_s = 0.0


def bootstrap_list(bootstrap: str | Iterable[str]) -> list[str]:
    if isinstance(bootstrap, str):
        return [s.strip() for s in bootstrap.split(",") if s.strip()]
    return list(bootstrap)


# --------------------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------------------


class _KafkaSourcePartition(StatefulSourcePartition[list[bytes], int | None]):
    """Reads one topic-partition; state is the next offset to read (or None if the
    start position has not been resolved yet)."""

    def __init__(
        self,
        tp: TopicPartition,
        consumer_config: dict[str, Any],
        start: StartFrom,
        resume_offset: int | None,
        batch_size: int,
        poll_timeout_ms: int,
        tail: bool,
        eof_idle_s: float,
        offset_timeout_ms: int,
        backoff: Backoff,
        on_lost_offset: OnLostOffset = "earliest",
        on_caught_up: Callable[[str], None] | None = None,
    ) -> None:
        self._tp = tp
        self._on_caught_up = on_caught_up
        """Called once, with the part key, the first time this partition reads to the
        end of its log."""
        self._on_lost_offset = on_lost_offset
        self._config = consumer_config
        self._start = start
        self._offset: int | None = resume_offset
        self._batch_size = batch_size
        self._poll_timeout_ms = poll_timeout_ms
        self._tail = tail
        self._eof_idle_s = eof_idle_s
        self._offset_timeout_ms = offset_timeout_ms
        self._backoff = backoff
        self._consumer: KafkaConsumer | None = None
        self._seek_pending = True
        self._latest_probe_started = False
        self._next_awake: datetime | None = None
        self._caught_up_since: float | None = None
        self._eof = False
        if resume_offset is not None:
            logger.info("%s: resuming at offset %d", part_key(*tp), resume_offset)

    # -- Bytewax API --------------------------------------------------------------------

    def next_batch(self) -> list[list[bytes]]:
        """Return ``[values]`` (one micro-batch) or ``[]``; StopIteration at EOF."""
        if self._eof:
            raise StopIteration()
        try:
            return self._next_batch()
        except StopIteration:
            raise
        except FATAL_CONFIG_ERRORS:
            raise
        except kerr.OffsetOutOfRangeError as exc:
            self._on_out_of_range(f"the broker reports it out of range ({exc})")
            return []
        except (kerr.KafkaError, OSError) as exc:
            self._on_error(exc)
            return []

    def next_awake(self) -> datetime | None:
        """Backoff deadline after an error, else None (Bytewax's automatic pacing)."""
        return self._next_awake

    def snapshot(self) -> int | None:
        """Next offset to read (None: not resolved yet, resolve from ``start``)."""
        return self._offset

    def close(self) -> None:
        """Close the consumer."""
        self._close_consumer()

    # -- internals ----------------------------------------------------------------------

    def _next_batch(self) -> list[list[bytes]]:
        consumer = self._ensure_consumer()
        if self._offset is None and not self._resolve_start(consumer):
            return []
        assert self._offset is not None
        if self._seek_pending:
            consumer.seek(self._tp, self._offset)
            self._seek_pending = False
        records = consumer.poll(
            timeout_ms=self._poll_timeout_ms, max_records=self._batch_size
        ).get(self._tp, [])
        self._backoff.reset()
        self._next_awake = None

        values: list[bytes] = []
        next_offset = self._offset
        for rec in records:
            if rec.offset < next_offset:
                continue  # never hand out an offset twice within a run
            # A tombstone (None value) becomes b"" so it reaches parse/dead-letters.
            values.append(rec.value if rec.value is not None else b"")
            next_offset = rec.offset + 1
        if values:
            self._offset = next_offset
            self._caught_up_since = None
            hw = consumer.highwater(self._tp)
            if hw is None:
                return [values]
            return [OffsetBatch(values, {part_key(*self._tp): (next_offset, max(int(hw), next_offset))})]

        # Nothing new. Skip over offsets the consumer consumed without returning
        # records (transaction markers, aborted records).
        position = consumer.position(self._tp, timeout_ms=0)  # no network wait
        if position is not None and position > self._offset:
            self._offset = position
        # Past the end of the log: the topic was deleted and recreated, or the broker
        # lost its data (Kafka answers OFFSET_OUT_OF_RANGE, handled above; Tansu answers
        # an empty fetch with a lower high watermark, which would wait here forever).
        hw = consumer.highwater(self._tp)
        if hw is not None and self._offset > hw:
            self._on_out_of_range(f"it is beyond the end of the log ({hw})", end=int(hw))
            return []
        if hw is not None and self._offset >= hw and self._on_caught_up is not None:
            callback, self._on_caught_up = self._on_caught_up, None
            callback(part_key(*self._tp))
        if not self._tail and self._drained(consumer):
            logger.info("%s: drained at offset %d (tail=False): EOF",
                        part_key(*self._tp), self._offset)
            self._eof = True
            self._close_consumer()
            raise StopIteration()
        return []

    def _drained(self, consumer: KafkaConsumer) -> bool:
        """True when this partition is read to its end (used only when tail=False).

        Drained means: (1) a Fetch response reported a high watermark and our next
        offset has reached it — the high watermark comes from a fetch sent after this
        partition started, so everything produced before the start has been read; (2)
        polls have stayed empty for ``eof_idle_s`` seconds since then (grace for
        records still in flight); and (3) a ListOffsets round trip succeeds and does
        not report more data (proves the broker is reachable, so a stale watermark
        during an outage never ends the stream; Tansu under-reports here, which can
        only make this check pass, never skip data).
        """
        assert self._offset is not None
        hw = consumer.highwater(self._tp)
        if hw is None or self._offset < hw:
            self._caught_up_since = None
            return False
        now = time.monotonic()
        if self._caught_up_since is None:
            self._caught_up_since = now
            return False
        if now - self._caught_up_since < self._eof_idle_s:
            return False
        end = consumer.end_offsets([self._tp], timeout_ms=self._offset_timeout_ms)[self._tp]
        if end > self._offset:
            self._caught_up_since = None
            return False
        return True

    def _ensure_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            consumer = KafkaConsumer(**self._config)
            try:
                consumer.assign([self._tp])
            except BaseException:
                consumer.close(autocommit=False, timeout_ms=1000)
                raise
            self._consumer = consumer
            self._seek_pending = True
            self._latest_probe_started = False
        return self._consumer

    def _resolve_start(self, consumer: KafkaConsumer) -> bool:
        """Resolve ``start`` into an offset; False while still resolving."""
        key = part_key(*self._tp)
        if self._start == "earliest":
            offset = consumer.beginning_offsets(
                [self._tp], timeout_ms=self._offset_timeout_ms
            )[self._tp]
            self._offset = int(offset)
            self._seek_pending = True
            logger.info("%s: starting at earliest offset %d", key, self._offset)
            return True
        # "latest": ListOffsets may under-report (Tansu), so seek there, poll once and
        # take the high watermark of the first Fetch response; records below it
        # existed at startup and are skipped.
        if not self._latest_probe_started:
            end = consumer.end_offsets([self._tp], timeout_ms=self._offset_timeout_ms)[self._tp]
            consumer.seek(self._tp, end)
            self._latest_probe_started = True
        consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=self._batch_size)
        hw = consumer.highwater(self._tp)
        if hw is None:
            return False
        self._offset = max(int(hw), consumer.position(self._tp, timeout_ms=0) or 0)
        self._seek_pending = True
        logger.info("%s: starting at latest offset %d", key, self._offset)
        return True

    def _on_out_of_range(self, reason: str, end: int | None = None) -> None:
        """Our offset is not on the broker (topic deleted and recreated, broker data
        lost, retention): log an error and apply the policy (``earliest``: the first
        offset still there, ``latest``: the end of the log, ``stop``: raise
        ``OffsetLostError``). ``end``: the end of the log when already known."""
        key = part_key(*self._tp)
        what = f"{key}: saved offset {self._offset} is not on the broker: {reason}"
        if self._on_lost_offset == "stop":
            logger.error("%s; stopping (offset_out_of_range = stop)", what)
            raise OffsetLostError(f"{what} (offset_out_of_range = stop)")
        try:
            consumer = self._ensure_consumer()
            if self._on_lost_offset == "earliest":
                target = int(consumer.beginning_offsets(
                    [self._tp], timeout_ms=self._offset_timeout_ms)[self._tp])
            else:
                target = end if end is not None else int(consumer.end_offsets(
                    [self._tp], timeout_ms=self._offset_timeout_ms)[self._tp])
        except (kerr.KafkaError, OSError) as lookup_exc:
            self._on_error(lookup_exc)
            return
        logger.error("%s; continuing from the %s offset %d (offset_out_of_range = %s)%s",
                     what, self._on_lost_offset, target, self._on_lost_offset,
                     "; records were lost to retention"
                     if self._on_lost_offset == "earliest" and (self._offset or 0) < target else "")
        self._offset = target
        self._seek_pending = True
        self._caught_up_since = None

    def _on_error(self, exc: BaseException) -> None:
        """Log, and retry after a backoff delay (via next_awake, never sleeping).

        A timeout (broker unreachable) keeps the consumer: kafka-python reconnects by
        itself and the fetch position is preserved. Any other error recreates the
        consumer, which then seeks back to our saved offset.
        """
        delay = self._backoff.next_delay()
        keep = isinstance(exc, kerr.KafkaTimeoutError) and self._consumer is not None
        logger.warning(
            "%s: Kafka error at offset %s: %s: %s; %s in %.1f s",
            part_key(*self._tp), self._offset, type(exc).__name__, exc,
            "retrying" if keep else "recreating the consumer", delay,
        )
        if not keep:
            self._close_consumer()
        self._caught_up_since = None
        self._next_awake = datetime.now(UTC) + timedelta(seconds=delay)

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        self._seek_pending = True
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=1000)
            except Exception as exc:  # noqa: BLE001 - closing a broken client
                logger.debug("error closing consumer: %s", exc)


class KafkaSource(FixedPartitionedSource[list[bytes], int | None]):
    """Read Kafka topics as micro-batches of message values.

    One Bytewax partition per topic-partition (key ``"topic#N"``); each partition owns a
    kafka-python ``KafkaConsumer`` with a manual ``assign`` + ``seek`` (no consumer
    group, no offset commits: offsets are the Bytewax resume state). ``next_batch``
    yields ``[values]`` where ``values: list[bytes]`` holds up to ``batch_size``
    message values in offset order, or ``[]`` when nothing arrived.

    Args:
        bootstrap: ``"host:port[,host:port]"`` or a list of them.
        topics: Topic names (one name is accepted too).
        start: Where a partition without resume state begins: ``"earliest"`` (first
            retained offset) or ``"latest"`` (the high watermark seen at startup).
        batch_size: Max messages per micro-batch (``poll(max_records=...)``).
        poll_timeout_ms: Longest a ``next_batch`` call blocks waiting for data, in ms.
            Small values keep the worker responsive; 0 is worse (kafka-python then
            adds ~100 ms latency).
        consumer_config: Extra ``KafkaConsumer`` settings, passed through (security,
            fetch sizes, ...). ``enable_auto_commit`` is always False.
        tail: True: follow the topics forever. False: raise EOF per partition once it
            is drained (see ``eof_idle_s``), e.g. to replay a topic and stop.
        eof_idle_s: With ``tail=False``, seconds a caught-up partition must stay idle
            before it ends.
        discovery_timeout_s: Seconds to keep retrying partition discovery at startup
            (broker down or topic not created yet) before failing.
        offset_timeout_ms: Timeout of offset lookups (ListOffsets), in ms.
        on_lost_offset: A resume offset that is not on the broker (the topic was
            deleted and recreated, the broker lost its data, retention deleted it):
            ``"earliest"`` reads from the first offset still there, ``"latest"`` skips
            to the end of the log, ``"stop"`` raises ``OffsetLostError``; each logs an
            error.
        backoff_initial_s: First retry delay after a broker error, seconds.
        backoff_max_s: Cap of the exponential retry delay, seconds.
        on_caught_up: Called once per partition (on the worker thread, with its part
            key) the first time a poll finds nothing new and the partition's next offset
            has reached the high watermark of a Fetch response: the backlog is read
            (the flow freezes its GC heap then: ``flows.runtime``).
    """

    def __init__(
        self,
        bootstrap: str | list[str],
        topics: list[str] | str,
        start: StartFrom = "earliest",
        batch_size: int = 1000,
        poll_timeout_ms: int = 10,
        consumer_config: Mapping[str, Any] | None = None,
        tail: bool = True,
        *,
        eof_idle_s: float = 0.5,
        discovery_timeout_s: float = 60.0,
        offset_timeout_ms: int = 1500,
        on_lost_offset: OnLostOffset = "earliest",
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        on_caught_up: Callable[[str], None] | None = None,
    ) -> None:
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', not {start!r}")
        if on_lost_offset not in ("earliest", "latest", "stop"):
            raise ValueError(f"on_lost_offset must be 'earliest', 'latest' or 'stop', "
                             f"not {on_lost_offset!r}")
        self.on_lost_offset = on_lost_offset
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.bootstrap = bootstrap_list(bootstrap)
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("at least one topic is required")
        self.start = start
        self.batch_size = batch_size
        self.poll_timeout_ms = poll_timeout_ms
        self.consumer_config = dict(consumer_config or {})
        self.tail = tail
        self.eof_idle_s = eof_idle_s
        self.discovery_timeout_s = discovery_timeout_s
        self.offset_timeout_ms = offset_timeout_ms
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_caught_up = on_caught_up

    def _kafka_config(self) -> dict[str, Any]:
        """Effective KafkaConsumer settings (defaults < consumer_config < forced)."""
        cfg: dict[str, Any] = {
            # Fail fast when the broker is down; we retry with our own backoff.
            "bootstrap_timeout_ms": 2000,
            # An out-of-range offset raises, so we can log it (see _on_out_of_range).
            "auto_offset_reset": "none",
            # kafka-python's reconnect backoff grows to 30 s by default: after a long
            # outage the client would idle that long once the broker is back.
            "reconnect_backoff_max_ms": 1000,
        }
        if not self.tail:
            # Faster high-watermark discovery for EOF detection.
            cfg["fetch_max_wait_ms"] = 100
        cfg.update(self.consumer_config)
        if cfg.get("enable_auto_commit"):
            logger.warning("KafkaSource ignores enable_auto_commit=True: offsets are "
                           "kept in Bytewax snapshots")
        cfg["enable_auto_commit"] = False
        cfg["bootstrap_servers"] = self.bootstrap
        return cfg

    def list_parts(self) -> list[str]:
        """Discover ``"topic#N"`` keys for all partitions of all topics.

        Retries (with backoff, a warning each time) while the broker is unreachable or
        a topic is not visible yet, for up to ``discovery_timeout_s`` seconds.
        """
        with waiting_for(f"partitions of {', '.join(self.topics)}", self.bootstrap):
            return self._list_parts()

    def _list_parts(self) -> list[str]:
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s)
        deadline = time.monotonic() + self.discovery_timeout_s
        while True:
            problem: str
            consumer: KafkaConsumer | None = None
            try:
                consumer = KafkaConsumer(**self._kafka_config())
                found = {t: consumer.partitions_for_topic(t) or set() for t in self.topics}
                missing = [t for t, parts in found.items() if not parts]
                if not missing:
                    keys = [part_key(t, p) for t in self.topics for p in sorted(found[t])]
                    logger.info("KafkaSource partitions: %s", keys)
                    return keys
                problem = f"topics not found yet: {missing}"
            except FATAL_CONFIG_ERRORS:
                raise
            except (kerr.KafkaError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close(autocommit=False, timeout_ms=1000)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"KafkaSource could not discover partitions of {self.topics} on "
                    f"{self.bootstrap} within {self.discovery_timeout_s} s: {problem}"
                )
            delay = backoff.next_delay()
            logger.warning("KafkaSource partition discovery: %s; retrying in %.1f s",
                           problem, delay)
            time.sleep(delay)

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _KafkaSourcePartition:
        """Build the reader of one topic-partition, resuming at ``resume_state``."""
        return _KafkaSourcePartition(
            tp=parse_part_key(for_part),
            consumer_config=self._kafka_config(),
            start=self.start,
            resume_offset=resume_state,
            batch_size=self.batch_size,
            poll_timeout_ms=self.poll_timeout_ms,
            tail=self.tail,
            eof_idle_s=self.eof_idle_s,
            offset_timeout_ms=self.offset_timeout_ms,
            backoff=Backoff(self.backoff_initial_s, self.backoff_max_s),
            on_lost_offset=self.on_lost_offset,
            on_caught_up=self.on_caught_up,
        )


# --------------------------------------------------------------------------------------
# Sink
