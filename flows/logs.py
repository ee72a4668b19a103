"""Logging setup: plain text or structured JSON lines (one object per record) on stderr.

``setup_logging(LogConfig(format="json"))`` makes every record one JSON object:
``{"ts": ISO-8601 UTC, "level", "logger", "message", ...extra fields}``; extra fields
are whatever the caller passed as ``extra={...}`` (and ``exc`` with the traceback).
streamrec's own loggers (flows, operators, state, models) log at ``level``; other
libraries (kafka-python is chatty at INFO) only from WARNING up.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from state.settings import doc

OWN_LOGGERS = ("flows", "operators", "state", "models", "streamrec")
"""Logger name prefixes of this project (set to the configured level)."""

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

TEXT_HIDDEN = ("status", "summary", "kafka")
"""Extra fields the text format leaves out: their message already says them readably
(the JSON format keeps them)."""


@dataclass
class LogConfig:
    """Logs of the flow and the CLI (stderr)."""

    format: Literal["text", "json"] = doc("text: human-readable lines; json: one JSON object "
                                          "per line (ts, level, logger, message, extra fields).",
                                          "text")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = doc("Level of streamrec's own loggers "
                                                              "(other libraries: WARNING).", "INFO")
    status_interval_s: float = doc("Wall time between the main flow's status lines (s): events, "
                                   "events/s, requests answered, dead letters, event-time lag, "
                                   "snapshot versions; 0 = none.", 5.0)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with ``extra={...}``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` (extra fields as JSON values)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in extra_fields(record).items() if k not in TEXT_HIDDEN}
        if extras:
            line += " " + " ".join(f"{k}={orjson.dumps(v, default=str).decode()}"
                                   for k, v in extras.items())
        return line


class StreamrecError(Exception):
    """An error the user fixes (a config key, an unreachable broker): reported as one
    line without a traceback (the CLI, and ``install_excepthook`` for
    ``python -m bytewax.run``)."""


def _streamrec_error(exc: BaseException | None) -> StreamrecError | None:
    """The StreamrecError in ``exc``'s cause chain (Bytewax wraps errors of sources)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StreamrecError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Uncaught StreamrecErrors print ``streamrec: error: MESSAGE`` (one line, exit
    status 1) instead of a traceback; any other error keeps its traceback."""
    if getattr(sys.excepthook, "_streamrec", False):
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        err = _streamrec_error(exc)
        if err is None:
            previous(kind, exc, tb)
        else:
            print(f"streamrec: error: {err}", file=sys.stderr, flush=True)

    hook._streamrec = True  # type: ignore[attr-defined]
    sys.excepthook = hook


class StderrForLogs:
    """The stream of our log handler: ``sys.stderr`` as it is at each write (so a
    redirected or captured stderr is honoured), or ``above`` while a progress bar sets
    it (lines then print above the bar, ``flows.progress``)."""

    def __init__(self) -> None:
        self.above: Callable[[str], None] | None = None

    def write(self, text: str) -> None:
        if self.above is not None:
            self.above(text)
        else:
            sys.stderr.write(text)

    def flush(self) -> None:
        if self.above is None:
            sys.stderr.flush()


STDERR = StderrForLogs()
"""The one stream every handler of ``setup_logging`` writes to."""


def setup_logging(config: LogConfig | None = None) -> None:
    """Install one stderr handler on the root logger (replacing a previous one of ours)."""
    config = config or LogConfig()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_streamrec", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(STDERR)
    handler._streamrec = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    from operators.kafka_logs import KafkaRetrySummary

    handler.addFilter(KafkaRetrySummary())
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(config.level)
