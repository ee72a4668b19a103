"""Profiles at rest and in memory: the decoded layout, its codec, the hot/cold table.

No Bytewax in here. A decoded profile (``Profile``) holds, per feature, one list
``[slices, tail, tail_end, *raw]`` (see ``state.profiles``; indices ``SLICES``, ``TAIL``,
``TAIL_END``, raw events from ``RAW`` on; no slices: ``NO_SLICES``). At rest a profile
is ``zlib(orjson([format, max_ts, cf, [[f, raw, slices, tail, tail_end], ...]]))``.
``HotCold`` keeps at most ``limit`` profiles decoded (LRU) and the others encoded,
and forgets the least recently used ones beyond ``max_entities``.

>>> from collections import Counter
>>> table = HotCold(n_feats=1, limit=1, level=6, max_entities=0, counters=Counter())
>>> table.load(1, create=True).feats[0] = [NO_SLICES, None, None, (5, 1)]
>>> _ = table.load(2, create=True)  # evicts profile 1 to the cold (encoded) side
>>> sorted(table.cold), table.load(1, create=False).feats[0]
([1], [(), None, None, (5, 1)])
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from state.profile_plan import FAR

FORMAT = 1
"""Format tag of encoded profiles and of store snapshots."""
SLICES, TAIL, TAIL_END, RAW = 0, 1, 2, 3
"""A feature's state is one list: its slices, its tail and the tail's end, then from
``RAW`` on its raw events (``fs[RAW:]``, ``(ts, value)`` sorted by ts): one tracked
container per feature instead of a state list holding a raw list."""
NO_SLICES: tuple[()] = ()
"""A feature's slices while it has none (a list once it has one): the empty tuple, which
the collector never tracks, so a feature written in the last minute (raw events only)
adds one tracked list fewer to the young generations (``bench/gc_census.py``)."""


class Profile:
    """Decoded profile. ``feats[f]`` is None or ``[slices, tail, tail_end, *raw]``."""

    __slots__ = ("max_ts", "cf", "feats", "dirty", "blob", "due", "due_min",
                 "memo", "out", "hi", "lo_max")

    def __init__(self, n_feats: int, due: int = FAR) -> None:
        self.max_ts: int | None = None  # newest event ts of this entity (ms)
        self.cf: int | None = None  # watermark floored to g0 at the last compaction pass
        self.feats: list[Any] = [None] * n_feats
        self.dirty = True
        self.blob: bytes | None = None  # the encoded profile while not dirty
        # per feature: the watermark at which its layout next needs compaction work
        # (not persisted: a decoded profile starts at -FAR = "check everything"); a tuple
        # of ints, replaced (``set_due``), never mutated: the collector untracks it
        self.due: tuple[int, ...] = (due,) * n_feats
        self.due_min = due
        # the store's memoised outputs (``state.profiles.blank_memo``), kept here rather
        # than in an object of their own (one tracked object fewer per hot profile read):
        # per output a block of values (None until the first read), the finished
        # outputs, and the query times (ms) between which every output holds
        self.memo: list[Any] | None = None
        self.out: Any = None  # dict[str, Any] once memo is set
        self.hi = 0
        self.lo_max = FAR

    def set_due(self, f: int, d: int) -> None:
        """Feature f's layout next needs work at watermark ``d`` (ms; ``due_min`` lowered
        to it if sooner): ``due`` replaced by a tuple with f's entry changed."""
        due = list(self.due)
        due[f] = d
        self.due = tuple(due)
        if d < self.due_min:
            self.due_min = d


def encode(p: Profile, level: int) -> bytes:
    """The at-rest bytes of a profile (zlib ``level``)."""
    feats = [[f, fs[RAW:], fs[SLICES], fs[TAIL], fs[TAIL_END]]
             for f, fs in enumerate(p.feats) if fs is not None]
    return zlib.compress(orjson.dumps([FORMAT, p.max_ts, p.cf, feats]), level)


def decode(blob: bytes, n_feats: int) -> Profile:
    """The decoded profile of ``encode``'s bytes (clean: ``blob`` is not kept here)."""
    fmt, max_ts, cf, feats = orjson.loads(zlib.decompress(blob))
    if fmt != FORMAT:
        raise ValueError(f"unsupported profile format {fmt!r}")
    p = Profile(n_feats, -FAR)
    p.max_ts, p.cf, p.dirty = max_ts, cf, False
    for f, raw, slices, tail, tail_end in feats:
        p.feats[f] = [[(s, e, _acc(acc)) for s, e, acc in slices] if slices else NO_SLICES,
                      _acc(tail), tail_end, *map(tuple, raw)]
    return p


def _acc(acc: Any) -> Any:
    """A decoded accumulator as ``state.aggregates`` makes it: a list of atomic values
    (mean, last, distinct_count) as a tuple; a last_k's list of entries as it is."""
    return tuple(acc) if type(acc) is list and acc and type(acc[0]) is not list else acc


class HotCold:
    """Profiles by key: ``hot`` (decoded, LRU order) and ``cold`` (encoded, least
    recently used first) hold disjoint keys. Counts ``encodes``, ``decodes`` and
    ``evicted`` in ``counters``."""

    def __init__(self, n_feats: int, limit: int, level: int, max_entities: int,
                 counters: dict[str, int]) -> None:
        self.n_feats = n_feats
        self.limit = limit
        self.level = level
        self.max_entities = max_entities
        self.counters = counters
        self.hot: OrderedDict[int, Profile] = OrderedDict()
        self.cold: dict[int, bytes] = {}
        self.on_evict: Callable[[int, Profile], None] | None = None
        """Called with a hot profile about to be encoded to the cold side."""

    def __len__(self) -> int:
        return len(self.hot) + len(self.cold)

    def encode(self, p: Profile) -> bytes:
        """``encode`` at this table's level, counted."""
        self.counters["encodes"] += 1
        return encode(p, self.level)

    def has(self, key: int) -> bool:
        """Whether ``key`` has a profile (hot or cold)."""
        return key in self.hot or key in self.cold

    def load(self, key: int, create: bool) -> Profile | None:
        """The decoded profile of ``key`` (created when ``create``; else None if unknown),
        now the most recently used; beyond ``max_entities`` the least recently used
        profile is dropped (``evicted``)."""
        hot = self.hot
        p = hot.get(key)
        if p is not None:
            hot.move_to_end(key)
            return p
        blob = self.cold.pop(key, None)
        if blob is not None:
            self.counters["decodes"] += 1
            p = decode(blob, self.n_feats)
            p.blob = blob
        elif create:
            p = Profile(self.n_feats)
        else:
            return None
        hot[key] = p
        if len(hot) > self.limit:
            k, q = hot.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(k, q)
            self.cold[k] = self.encode(q) if q.dirty or q.blob is None else q.blob
        if self.max_entities and len(self.cold) + len(hot) > self.max_entities:
            cold = self.cold
            while cold and len(cold) + len(hot) > self.max_entities:
                del cold[next(iter(cold))]
                self.counters["evicted"] += 1
        return p

    def change(self, key: int, fn: Callable[[Profile], None]) -> bool:
        """Apply ``fn`` to the profile of ``key`` without making it the most recently
        used (a cold one is decoded, changed and encoded again in its place); False when
        ``key`` has no profile."""
        p = self.hot.get(key)
        if p is not None:
            fn(p)
            return True
        blob = self.cold.get(key)
        if blob is None:
            return False
        self.counters["decodes"] += 1
        p = decode(blob, self.n_feats)
        fn(p)
        self.cold[key] = self.encode(p)  # an existing key keeps its place in the order
        return True

    def blobs(self) -> dict[int, bytes]:
        """Every profile encoded, least recently used first (changed hot ones are
        encoded now and stay hot)."""
        out = dict(self.cold)
        for key, p in self.hot.items():
            if p.dirty:
                p.blob = self.encode(p)
                p.dirty = False
            out[key] = p.blob  # type: ignore[assignment]
        return out
