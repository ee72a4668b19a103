"""An ``OrderedDict`` that counts its writes and remembers the keys of the latest ones.

A reader that copied some values (serving's per-candidate catalog attributes,
``ItemRows.catalog_attrs``) asks ``changed_since(version)`` and re-reads only the keys
written since, instead of looking every key up again. Every write counts: setting,
deleting, popping (the LRU eviction of ``lru_put``), clearing; ``move_to_end`` changes
no value and does not. Memory: the dict plus ``LOG`` key references (the keys are the
dict's own strings, or evicted ones kept until they leave the log).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

LOG = 1_024
"""Keys of the latest writes kept; a reader further behind re-reads everything."""

_MISSING = object()

_SET = OrderedDict.__setitem__


class ChangeLogDict(OrderedDict):  # type: ignore[type-arg]
    """``OrderedDict`` with ``version`` (writes so far) and ``changed_since``."""

    def __init__(self, items: Iterable[tuple[Any, Any]] = ()) -> None:
        self.version = 0
        self._log: deque[Any] = deque(maxlen=LOG)
        super().__init__()
        for key, value in items:
            self[key] = value

    def _wrote(self, key: Any) -> None:
        self.version += 1
        self._log.append(key)

    def changed_since(self, version: int) -> list[Any] | None:
        """The keys written after ``version`` (repeats possible), or None when the log
        no longer reaches back that far (or ``version`` is not one of this dict's)."""
        behind = self.version - version
        if behind < 0 or behind > len(self._log):
            return None
        return list(self._log)[len(self._log) - behind:] if behind else []

    def __setitem__(self, key: Any, value: Any) -> None:
        _SET(self, key, value)  # and _wrote(key), inline: every catalog write of a shard
        self.version += 1
        self._log.append(key)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._wrote(key)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        if key in self:
            self._wrote(key)
            return super().pop(key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self, last: bool = True) -> tuple[Any, Any]:
        key, value = super().popitem(last=last)
        self._wrote(key)
        return key, value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        keys = list(self)
        super().clear()
        for key in keys:
            self._wrote(key)

    def copy(self) -> ChangeLogDict:
        return ChangeLogDict(self.items())

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as its items (a restored dict starts a new log: its readers are new)."""
        return (ChangeLogDict, (list(self.items()),))
