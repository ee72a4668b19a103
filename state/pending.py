"""A joiner's pending impressions as columns: one row per impression, no object of its own.

The joiner of a user shard holds every impression whose attribution window is open (up
to ``join.max_pending`` per shard, ten minutes of them by default). Held as one
``Pending`` object (and one deferred-features object) per impression they cost two
allocations with a Python ``__init__`` each and two more objects for every garbage
collection to scan; as columns (parallel lists indexed by a row number, rows reused
through a free list) an impression costs a slot in each list and its id in ``rows``.
The event itself (``events.model.Impression``, made by the parser) is kept as it is.

Recovery state is the columns themselves (lists of plain values; the features column
resolved to dicts first, ``state.join_state.Joiner.__getstate__``). The layout changed
with this module (joiner4): recovery snapshots of earlier versions (one ``Pending``
per impression) are not read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from events.model import Impression

KEPT = 1
"""``flags`` bit: the sampler keeps its negative (meaningful with ``DECIDED``)."""
EMITTED = 2
"""``flags`` bit: its positive example was emitted (later feedback is a late label)."""
DECIDED = 4
"""``flags`` bit: the sampler's decision was taken at the intake and is ``KEPT``'s (else it
is taken from the id when needed: ``NegativeSampler.keep_impressions``)."""

NO_LABELS: dict[str, float] = {}
"""The labels of every pending impression without feedback yet (never written: the
first label gives the row a dict of its own)."""


class PendingColumns:
    """Pending impressions by row: ``rows`` maps an impression id to its row; the other
    attributes are the columns. The joiner reads and writes the columns directly (a list
    index per field); ``add`` and ``release`` manage the rows."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        """Impression id -> row, for every pending impression, in arrival order."""
        self.impression: list[Impression | None] = []
        self.deadline: list[int] = []
        """When the window closes (event time, ms)."""
        self.labels: list[dict[str, float]] = []
        """Action -> value of the feedback joined so far (``NO_LABELS`` for none)."""
        self.features: list[Any] = []
        """Taken when the impression is processed (never later: features taken at
        emission would see same-request clicks and fresher item tables): a dict at
        example precision, or the context's deferred token (computed on demand, the same
        values); None once the positive was emitted (no longer needed)."""
        self.flags: list[int] = []
        """Bits: ``EMITTED`` when its positive example was emitted; ``DECIDED`` (and
        ``KEPT``) when the sampler's keep decision was taken at the intake."""
        self.free: list[int] = []
        """Rows released for reuse."""

    def add(self, imp: Impression, deadline_ms: int, features: Any, flags: int) -> int:
        """Hold ``imp`` (its id must not be pending); returns its row."""
        free = self.free
        if free:
            row = free.pop()
            self.impression[row] = imp
            self.deadline[row] = deadline_ms
            self.features[row] = features
            self.flags[row] = flags
        else:
            row = len(self.impression)
            self.impression.append(imp)
            self.deadline.append(deadline_ms)
            self.labels.append(NO_LABELS)
            self.features.append(features)
            self.flags.append(flags)
        self.rows[imp.impression_id] = row
        return row

    def extend(self, imps: list[Impression], ids: list[str], deadline_ms: int,
               features: list[Any], flags: Iterable[int]) -> None:
        """``add`` of each of ``imps`` (their ids ``ids``, none pending; one deadline;
        ``flags`` theirs) when no row is free: the rows ``add`` would give them one by one
        (appended in order), each column extended at once."""
        n, start = len(imps), len(self.impression)
        self.impression += imps
        self.deadline += repeat(deadline_ms, n)
        self.labels += repeat(NO_LABELS, n)
        self.features += features
        self.flags += flags
        self.rows.update(zip(ids, range(start, start + n), strict=True))

    def release(self, rows: list[int]) -> None:
        """Free rows already taken out of ``rows`` (their objects are let go)."""
        impression, labels, features = self.impression, self.labels, self.features
        for row in rows:  # (3.11 specialises these stores: faster than a map in C)
            impression[row] = None
            labels[row] = NO_LABELS
            features[row] = None
        self.free.extend(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def view(self) -> PendingView:
        """A read-only mapping of impression id -> ``PendingEntry`` (tests, tools)."""
        return PendingView(self)


class PendingEntry(NamedTuple):
    """One pending impression as read through ``PendingView`` (a copy of its row)."""

    impression: Impression
    deadline_ms: int
    labels: dict[str, float]
    features: Any
    emitted: bool


class PendingView(Mapping[str, PendingEntry]):
    """Impression id -> ``PendingEntry`` over ``PendingColumns`` (read-only)."""

    def __init__(self, columns: PendingColumns) -> None:
        self._columns = columns

    def __getitem__(self, iid: str) -> PendingEntry:
        c = self._columns
        row = c.rows[iid]
        imp = c.impression[row]
        assert imp is not None
        return PendingEntry(imp, c.deadline[row], c.labels[row], c.features[row],
                            bool(c.flags[row] & EMITTED))

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns.rows)

    def __len__(self) -> int:
        return len(self._columns.rows)


class ClosedIds:
    """Ids of closed impressions (and of interactions) -> when they closed (event time,
    ms), remembered for dedup and forgotten oldest first (``forget``).

    A plain dict for membership and an insertion-order queue of the ids for forgetting:
    the windows of a micro-batch close together (``add_many``: one dict update and one
    queue extend in C), where an ``OrderedDict`` paid a linked-list node per id (7% of the
    user shard on the joiner path). An id added again keeps its first place, as in an
    ``OrderedDict``."""

    def __init__(self, items: Iterable[tuple[str, int]] = ()) -> None:
        self.at: dict[str, int] = dict(items)
        """Id -> event time (ms) it closed."""
        self.order: deque[str] = deque(self.at)
        """Each held id once, in the order it was first added."""

    def __contains__(self, iid: object) -> bool:
        return iid in self.at

    def __len__(self) -> int:
        return len(self.at)

    def add(self, iid: str, ts_ms: int) -> None:
        if iid not in self.at:
            self.order.append(iid)
        self.at[iid] = ts_ms

    def add_many(self, ids: list[str], ts_ms: list[int]) -> None:
        """``add`` of each id with its time, in order: one dict update, and the ids take
        their places at once when the dict grew by all of them (all new and distinct:
        the joiner's closes); otherwise only the new ones do, once (the ids held before
        are those of ``order``: each held id has one place there)."""
        at = self.at
        held = len(at)
        at.update(zip(ids, ts_ms, strict=True))
        if len(at) - held == len(ids):
            self.order.extend(ids)
        else:  # some were there (an interaction key equal to an id) or repeated: rare
            before = set(self.order)
            self.order.extend([iid for iid in dict.fromkeys(ids) if iid not in before])

    def forget(self, horizon_ms: int, limit: int) -> None:
        """Forget ids from the oldest on while they closed at or before ``horizon_ms`` or
        more than ``limit`` are held; stop at the first one to keep."""
        at, order = self.at, self.order
        while order:
            iid = order[0]
            ts = at.get(iid)
            if ts is None:  # not held (never the case: each held id has one place)
                order.popleft()
                continue
            if ts > horizon_ms and len(at) <= limit:
                break
            del at[iid]
            order.popleft()
