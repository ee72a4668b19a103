"""Progress of the long CLI commands (simulate, import, replay, eval).

On a terminal: a tqdm bar on stderr with the count, the total and the ETA when the
total is known. Without a terminal (a pipe, a file, CI) or with ``--quiet``: no bar,
but a status line in the log every ``log_every_s`` (and one at the end), so a log
still shows how far a long job got. While a bar is shown, log lines print above it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from tqdm import tqdm

from flows.logs import STDERR
from operators.status import human_duration

logger = logging.getLogger("streamrec.progress")


def _write_above(text: str) -> None:
    text = text.rstrip("\n")
    if text:
        tqdm.write(text, file=sys.stderr)


@contextlib.contextmanager
def _logs_above_the_bar() -> Iterator[None]:
    """Log lines print above the bar meanwhile (``flows.logs.STDERR``)."""
    STDERR.above = _write_above
    try:
        yield
    finally:
        STDERR.above = None


class Progress:
    """Counts units of work (events) toward an optional ``total``.

    Args:
        label: Names the job in the bar and the log lines (``replay``).
        total: Units expected; None when unknown (no percentage, no ETA).
        quiet: No bar even on a terminal (log lines only).
        log_every_s: Wall time between log lines when there is no bar (s).
        stream: Where the bar goes (default stderr); a bar needs ``stream.isatty()``.
    """

    def __init__(self, label: str, total: int | None = None, *, quiet: bool = False,
                 log_every_s: float = 10.0, unit: str = "events",
                 stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.count = 0
        stream = stream or sys.stderr
        self.bar_on = not quiet and stream.isatty()
        self._bar: Any = tqdm(total=total, desc=label, unit=f" {unit}", unit_scale=True,
                              file=stream, disable=not self.bar_on, mininterval=0.5,
                              dynamic_ncols=True, smoothing=0.1)
        self._redirect = contextlib.ExitStack()
        if self.bar_on:
            self._redirect.enter_context(_logs_above_the_bar())
        self.log_every_s = log_every_s
        self.start = time.monotonic()
        self._next_log = self.start + log_every_s

    def add(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.set(self.count + n)

    def set(self, count: int) -> None:
        """``count`` units done so far."""
        if count > self.count:
            self._bar.update(count - self.count)
            self.count = count
        if not self.bar_on and time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + self.log_every_s
            logger.info(self.line())

    def line(self) -> str:
        """``replay: 120,000 of 1,000,000 events (12%), 25,000/s, 4.8 s, ETA 35.2 s``."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.count / elapsed
        done = f"{self.count:,}"
        tail = ""
        if self.total:
            done += f" of {self.total:,}"
            tail = f" ({100 * self.count / self.total:.0f}%)"
        text = f"{self.label}: {done} {self.unit}{tail}, {rate:,.0f}/s, {human_duration(elapsed)}"
        if self.total and rate > 0 and self.count < self.total:
            text += f", ETA {human_duration((self.total - self.count) / rate)}"
        return text

    def close(self) -> None:
        """End the bar; without a bar, log the final line."""
        self._bar.close()
        self._redirect.close()
        if not self.bar_on:
            logger.info(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
