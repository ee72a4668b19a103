"""The start-up wait for a Kafka broker, of the flows and the CLI.

:func:`wait_for_broker` waits up to ``kafka.startup_timeout_s`` for the broker to answer
(kafka-python's retry noise meanwhile summarised by ``operators.kafka_logs``), then
fails with one :class:`BrokerUnavailable` error that says what to check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flows.logs import StreamrecError
from operators.kafka_logs import waiting_for

if TYPE_CHECKING:
    from flows.config import Config

logger = logging.getLogger("streamrec.kafka")


class BrokerUnavailable(StreamrecError, RuntimeError):
    """No Kafka broker answered in time; the message says which and what to check."""


def wait_for_broker(bootstrap: str, client: Mapping[str, Any] | None = None,
                    timeout_s: float = 60.0, what: str = "the broker") -> None:
    """Block until a broker at ``bootstrap`` answers a metadata request (kafka-python
    settings ``client``: security), up to ``timeout_s``; then raise
    :class:`BrokerUnavailable`. Logs one line when the broker answers after failures."""
    from kafka.errors import KafkaError

    from flows.broker import broker_metadata

    start = time.monotonic()
    deadline = start + timeout_s
    problem = ""
    with waiting_for(what, bootstrap):
        while True:
            remaining = deadline - time.monotonic()
            try:
                broker_metadata(bootstrap, timeout_s=max(0.5, min(5.0, remaining)),
                                client=client)
                if problem:
                    logger.info("Kafka: %s answered after %.0f s", bootstrap,
                                time.monotonic() - start)
                return
            except (KafkaError, OSError) as exc:
                problem = str(exc) if str(exc).startswith(type(exc).__name__) else \
                    f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s "
                    f"(waiting for {what}; last error {problem}). Check kafka.bootstrap "
                    f"(or --bootstrap) and that the broker runs; a local one: streamrec broker")
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def wait_for_kafka(config: Config, what: str) -> None:
    """The start-up check of a flow built from ``config``: when it reads or writes Kafka
    and ``kafka.startup_timeout_s`` > 0, :func:`wait_for_broker` for ``what``."""
    uses_kafka = config.output.kind == "kafka" or any(i.kind == "kafka" for i in config.inputs)
    if uses_kafka and config.kafka.startup_timeout_s > 0:
        wait_for_broker(config.kafka.bootstrap, config.kafka.client_settings("consumer"),
                        config.kafka.startup_timeout_s, what)
