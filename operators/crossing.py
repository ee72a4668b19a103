"""Stage inputs that may cross to another process, pickled once.

Bytewax sends an item routed to a worker of another process as a pickle, and pickles it
twice on the sending side: timely asks for the message's size, then writes it, and both
serialize every item (``pickle.dumps``; 6,882 dumps for 3,441 loads counted in a
60,000-event 2-process run). ``PickledOnce(value)`` keeps the pickle of ``value`` made
by the first ``dumps`` and hands the same bytes to the second; the receiving process
unpickles ``value`` itself, as before. An item that stays in its process is never
pickled: its stage gets the wrapper, and ``Unwrapped`` gives that stage the value either
way; ``UnwrappedPartition`` does the same for a sink partition (the user shards' file
records and answers go to ``operators.sinks.NamedSinks`` wrapped). Nothing about the
value changes (one process: the same object; two: the same pickle round trip), so
outputs are equal bit for bit.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Generic, TypeVar

from bytewax.operators import StatefulLogic
from bytewax.outputs import StatefulSinkPartition

W = TypeVar("W")
S = TypeVar("S")

_DUMPS, _LOADS = pickle.dumps, pickle.loads
"""The pickle functions as imported: a tool that wraps ``pickle.dumps``/``loads`` to
count what crosses (bench/scaleout.py) then sees each crossing item once, and the
reconstructor below stays importable by name."""


def _unpickle(data: bytes) -> Any:
    """The value a ``PickledOnce`` was pickled from (its reconstructor)."""
    return _LOADS(data)


class PickledOnce:
    """``value``, pickled at most once however often it is pickled (``__reduce__``
    returns the bytes of the first time); unpickles as ``value`` itself."""

    __slots__ = ("_pickled", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._pickled: bytes | None = None

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        if self._pickled is None:
            self._pickled = _DUMPS(self.value, protocol=pickle.HIGHEST_PROTOCOL)
        return _unpickle, (self._pickled,)


def unwrap(value: Any) -> Any:
    """The value of a ``PickledOnce`` that stayed in its process; any other value (one
    that crossed arrives unpickled) as it is."""
    return value.value if type(value) is PickledOnce else value


class Unwrapped(StatefulLogic[Any, W, S], Generic[W, S]):
    """A stateful stage's logic fed ``PickledOnce`` items: ``inner`` gets their values
    (every other call, and the snapshot, are ``inner``'s)."""

    def __init__(self, inner: StatefulLogic[Any, W, S]) -> None:
        self.inner = inner

    def on_item(self, value: Any) -> tuple[Iterable[W], bool]:
        return self.inner.on_item(unwrap(value))

    def on_notify(self) -> tuple[Iterable[W], bool]:
        return self.inner.on_notify()

    def on_eof(self) -> tuple[Iterable[W], bool]:
        return self.inner.on_eof()

    def notify_at(self) -> datetime | None:
        return self.inner.notify_at()

    def snapshot(self) -> S:
        return self.inner.snapshot()


class UnwrappedPartition(StatefulSinkPartition[Any, S], Generic[S]):
    """A sink partition fed ``PickledOnce`` items: ``inner`` writes their values (its
    snapshot and close are ``inner``'s)."""

    def __init__(self, inner: StatefulSinkPartition[Any, S]) -> None:
        self.inner = inner

    def write_batch(self, values: list[Any]) -> None:
        self.inner.write_batch(list(map(unwrap, values)))

    def snapshot(self) -> S:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()
