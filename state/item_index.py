"""ANN index of item vectors (hnswlib HNSW), refreshed incrementally, served from snapshots.

No Bytewax in here. Three roles:

* :class:`ItemIndex` - an hnswlib index plus the item ID <-> label map. ``upsert``
  inserts new items and replaces changed ones by marking the old node deleted and
  inserting the new vector as a fresh node under a new label (labels are never
  reused); ``remove`` marks items deleted (``mark_deleted``: never returned again).
  Why not hnswlib's own update (re-adding an existing label updates it in place) or
  slot reuse (``replace_deleted=True``): both repair links in a way that loses
  recall - measured recall@100 0.971 -> 0.933 after 10% of 50k items changed and 0.897
  after 50%, against 0.967 / 0.963 with delete + insert, at about the same cost.
  Deleted nodes keep routing searches until the next rebuild drops them.
  ``save``/``load`` use ONE ``.npz`` file (no pickled objects): hnswlib's own
  serialisation arrays (its pickle state), the label map (UTF-8 blob + offsets) and
  the build parameters, so the snapshot store's sha256 covers everything.
* :class:`IndexBuilder` - owns the one mutable index (single writer), applies item
  changes with the refresh policy (incremental, or a full rebuild when more than
  ``rebuild_fraction`` of the items changed or more than ``max_deleted_fraction`` of
  the slots hold deleted items) and ``publish``-es immutable versions (kind ``index``)
  to a :class:`~state.snapshot_store.SnapshotStore`.
* :class:`IndexReader` - serving: holds an immutable loaded snapshot (verified via
  :class:`~state.snapshot_store.SnapshotReader`) and hot-swaps to newer versions.
  Queries read one attribute (a ``(manifest, index)`` tuple) and never take a lock;
  a swap is one attribute assignment after the new copy is fully loaded, so a query
  sees either the old or the new version, never a mix. Readers never share the
  builder's index (hnswlib ``add_items`` is not safe beside ``knn_query``).

**Space.** Default ``ip`` (inner product) on the raw MF vectors, *not* normalised:
the served score is exactly the model's ``<u, v>`` and vector norms (which grow with
an item's positives) carry popularity. ``space="cosine"`` makes hnswlib normalise
(scores are then cosines). Scores returned are ``<q, v>`` (``ip``) or ``cos``.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import hnswlib
import numpy as np

from state.npz import save_npz
from state.packing import pack_strings, unpack_strings
from state.settings import doc
from state.snapshot_store import Manifest, SnapshotReader, SnapshotStore

log = logging.getLogger(__name__)

KIND = "index"
_FORMAT = 1


@dataclass(frozen=True)
class IndexConfig:
    """The ANN index of item vectors: build, serving and refresh parameters (the flow's
    ``[index]`` config table; stored in every snapshot). ``dim`` is not a config key:
    the flow sets it to the item vectors' dimension (``with_dim``).

    >>> IndexConfig().with_dim(8).dim
    8
    """

    dim: int = field(default=0, metadata={"config": False})
    space: Literal["ip", "cosine"] = doc("Similarity: ip (inner product on the raw MF "
                                         "vectors) or cosine.", "ip")
    M: int = doc("HNSW graph degree (level 0 holds 2 M links).", 16)
    ef_construction: int = doc("HNSW build breadth.", 100)
    ef: int = doc("HNSW serving search breadth (effective ef is max(ef, k)).", 200)
    threads: int = doc("Threads inserting into the HNSW graph (refreshes and rebuilds; queries "
                       "use 1); 1 makes the graph, and so the ANN candidates, the same in every "
                       "replay of a log (several threads insert in a racy order).", 2)
    rebuild_fraction: float = doc("Changed/live items above which a refresh rebuilds.", 0.3)
    max_deleted_fraction: float = doc("Deleted/allocated slots above which a refresh rebuilds.", 0.3)
    initial_capacity: int = doc("Slots allocated at first (grows by >= 1.5x).", 1024)
    seed: int = doc("HNSW level generator seed.", 100)
    refresh_interval_ms: int = doc("Event time between index snapshots (ms).", 300_000)

    def __post_init__(self) -> None:
        if (self.dim < 0 or self.M < 2 or self.ef < 1 or self.ef_construction < 1
                or self.threads < 1):
            raise ValueError("need dim >= 0, M >= 2, ef >= 1, ef_construction >= 1, threads >= 1")
        if self.space not in ("ip", "cosine"):
            raise ValueError(f"unsupported space {self.space!r} (ip or cosine)")

    def with_dim(self, dim: int) -> IndexConfig:
        """This config for vectors of ``dim`` dimensions."""
        return replace(self, dim=dim)

    @classmethod
    def from_json(cls, text: str) -> IndexConfig:
        """The config of a snapshot (``num_threads``: the name before ``threads``)."""
        data = json.loads(text)
        if "num_threads" in data:
            data["threads"] = data.pop("num_threads")
        return cls(**data)


def exact_topk(
    matrix: np.ndarray, query: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum inner product search: ``(rows (q, k), scores (q, k))`` best first.

    ``matrix`` is ``(n, dim)``, ``query`` ``(dim,)`` or ``(q, dim)``.
    """
    q = np.atleast_2d(np.asarray(query, np.float32))
    scores = q @ np.asarray(matrix, np.float32).T
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((q.shape[0], 0), np.int64), np.zeros((q.shape[0], 0), np.float32)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(ps, order, axis=1)


class ItemIndex:
    """HNSW over item vectors with an item ID <-> label map.

    Invariants: every live item has exactly one label and every live label one item;
    labels are never reused; ``slots - len(self)`` slots hold deleted items.
    A ``frozen`` index (a loaded serving copy) refuses writes.

    >>> index = ItemIndex(IndexConfig(dim=2, threads=1))
    >>> index.upsert(["a", "b", "c"], np.array([[1, 0], [0, 1], [0.9, 0.1]], np.float32))
    (3, 0)
    >>> [item for item, _ in index.query(np.array([1, 0], np.float32), k=2)]
    ['a', 'c']
    >>> index.remove(["a"]), [item for item, _ in index.query(np.array([1, 0], np.float32), k=2)]
    (1, ['c', 'b'])
    """

    def __init__(self, config: IndexConfig, capacity: int | None = None) -> None:
        if config.dim < 1:
            raise ValueError("IndexConfig.dim: set the vector dimension (with_dim) first")
        self.config = config
        self.frozen = False
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._next_label = 0
        self._index = self._new_hnsw(capacity or config.initial_capacity)
        self._exact_cache: tuple[np.ndarray, list[str]] | None = None
        self._ids_list: list[str] | None = None  # cached for sample()
        self.fallbacks = 0  # queries answered exactly because HNSW returned too few

    def _new_hnsw(self, capacity: int) -> hnswlib.Index:
        c = self.config
        index = hnswlib.Index(space=c.space, dim=c.dim)
        index.init_index(
            max_elements=max(1, capacity), M=c.M, ef_construction=c.ef_construction,
            random_seed=c.seed, allow_replace_deleted=False,
        )
        index.set_ef(c.ef)
        index.set_num_threads(c.threads)
        return index

    # --- sizes ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live (searchable) items."""
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    @property
    def slots(self) -> int:
        """Allocated graph nodes, live or deleted."""
        return int(self._index.element_count)

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    @property
    def deleted(self) -> int:
        """Slots holding deleted (removed or replaced) items, until the next rebuild."""
        return self.slots - len(self)

    def item_ids(self) -> list[str]:
        return list(self._label_of)

    def stats(self) -> dict[str, int]:
        return {"items": len(self), "slots": self.slots, "deleted": self.deleted,
                "capacity": self.capacity, "fallbacks": self.fallbacks}

    # --- writes -----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.frozen:
            raise RuntimeError("this ItemIndex is a frozen serving copy; write to the IndexBuilder")

    def _as_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, self.config.dim)
        if not np.isfinite(x).all():
            raise ValueError("vectors must be finite (a NaN would corrupt the graph)")
        return x

    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> tuple[int, int]:
        """Insert new items and replace the vectors of known ones (last one wins on
        repeats). Returns ``(added, updated)``.

        A replaced item's old node is marked deleted and the new vector inserted as a
        fresh node under a new label: hnswlib's in-place update (re-adding a label) and
        slot reuse (``replace_deleted``) repair links in a way that measurably degrades
        recall (recall@100 0.97 -> 0.93 after 10% of 50k items updated, vs 0.967 with
        delete + insert; ``bench/index.py``). Deleted nodes still route searches and
        are dropped by the next rebuild.
        """
        self._check_writable()
        ids = list(item_ids)
        x = self._as_vectors(vectors, len(ids))
        if len(set(ids)) < len(ids):  # keep the last occurrence of each item
            last = {item: j for j, item in enumerate(ids)}
            keep = sorted(last.values())
            ids, x = [ids[j] for j in keep], x[keep]
        if not ids:
            return 0, 0
        updated = 0
        for item in ids:
            lab = self._label_of.pop(item, None)
            if lab is not None:
                del self._id_of[lab]
                self._index.mark_deleted(lab)
                updated += 1
        need = self.slots + len(ids)
        if need > self.capacity:
            self._index.resize_index(max(need, int(self.capacity * 1.5) + 1))
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.uint64)
        self._next_label += len(ids)
        self._index.add_items(x, labels, num_threads=self.config.threads)
        for item, lab in zip(ids, labels.tolist(), strict=True):
            self._label_of[item] = lab
            self._id_of[lab] = item
        self._exact_cache = None
        self._ids_list = None
        return len(ids) - updated, updated

    def remove(self, item_ids: Iterable[str]) -> int:
        """Mark items deleted (never returned again); returns how many were live."""
        self._check_writable()
        n = 0
        for item in item_ids:
            lab = self._label_of.pop(item, None)
            if lab is None:
                continue
            del self._id_of[lab]
            self._index.mark_deleted(lab)
            n += 1
        if n:
            self._exact_cache = None
            self._ids_list = None
        return n

    def rebuild(self) -> None:
        """Re-create the graph from the live items (drops deleted slots; same labels)."""
        self._check_writable()
        ids = list(self._label_of)
        labels = np.fromiter((self._label_of[i] for i in ids), np.uint64, len(ids))
        x = self._index.get_items(labels, return_type="numpy") if ids else np.zeros((0, self.config.dim))
        index = self._new_hnsw(max(self.config.initial_capacity, int(len(ids) * 1.25)))
        if ids:
            index.add_items(np.asarray(x, np.float32), labels, num_threads=self.config.threads)
        self._index = index
        self._exact_cache = None

    # --- reads --------------------------------------------------------------------------------

    def vectors(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors (n, dim) float32, found (n,) bool)``; missing items read zeros.
        (With ``space="cosine"`` hnswlib stores, and returns, normalised vectors.)"""
        n = len(item_ids)
        get = self._label_of.get
        labels = [get(i) for i in item_ids]  # one lookup per id; None: not in the index
        out = np.zeros((n, self.config.dim), np.float32)
        if n and None not in labels:  # all found (the usual case): no mask to build
            out[:] = self._stored(labels)
            return out, np.ones(n, bool)
        found = np.fromiter((lab is not None for lab in labels), bool, n)
        if found.any():
            out[found] = self._stored([lab for lab in labels if lab is not None])
        return out, found

    _dense: tuple[np.ndarray, np.ndarray] | None = None
    """A frozen index's stored vectors copied out: (live labels sorted (uint64), their
    vectors (n, dim) float32); None until built (``_stored``)."""
    _asked = 0
    """Labels read through ``get_items`` so far (a frozen index, before ``_dense``)."""

    def _stored(self, labels: list[int]) -> np.ndarray:
        """hnswlib's stored vectors of the live ``labels``, one float32 row each.

        ``get_items`` costs ~1 us a label (one vector allocated per label). A frozen
        index (immutable) copies every live vector out in one call once the labels it
        was asked for reach its item count, and from then on gathers rows (the same
        floats): at most twice the reads of the cheaper choice for its whole life, and
        one read per item when it is asked many times (the joiner's and MF's item
        vectors of a serving copy, ~50x cheaper per label)."""
        dense = self._dense
        if dense is None:
            if not self.frozen or self._asked < len(self._label_of):
                self._asked += len(labels)
                return self._index.get_items(labels, return_type="numpy")  # type: ignore[no-any-return]
            order = np.sort(np.fromiter(self._label_of.values(), np.uint64, len(self._label_of)))
            dense = self._dense = (order, self._index.get_items(order, return_type="numpy"))
        order, x = dense
        return x[np.searchsorted(order, np.asarray(labels, np.uint64))]  # type: ignore[no-any-return]

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` live items uniformly at random, with replacement (e.g. BPR negatives
        drawn on the user side from the served snapshot)."""
        ids = self._ids_list
        if ids is None:
            ids = self._ids_list = list(self._label_of)
        if not ids:
            return []
        return [ids[j] for j in rng.integers(0, len(ids), n).tolist()]

    def _score(self, dist: np.ndarray) -> np.ndarray:
        return 1.0 - dist  # hnswlib ip / cosine distance is 1 - <q, v>

    def query(self, vec: np.ndarray, k: int, exclude: Iterable[str] | None = None) -> list[tuple[str, float]]:
        """Approximate top ``k`` items by score (best first), never one in ``exclude``.

        Few exclusions (<= max(k, 64) present in the index) are over-fetched; more use
        hnswlib's label filter. If HNSW cannot return enough results (tiny or heavily
        deleted graphs) the exact search answers instead (counted in ``fallbacks``).
        """
        live = len(self)
        if live == 0 or k <= 0:
            return []
        q = np.ascontiguousarray(vec, dtype=np.float32).reshape(1, self.config.dim)
        ex_labels = (
            {lab for e in exclude if (lab := self._label_of.get(e)) is not None} if exclude else set()
        )
        want = min(k, live - len(ex_labels))
        if want <= 0:
            return []
        try:
            if len(ex_labels) <= max(k, 64):
                kk = min(live, k + len(ex_labels))
                labels, dist = self._index.knn_query(q, k=kk, num_threads=1)
            else:
                labels, dist = self._index.knn_query(
                    q, k=want, num_threads=1, filter=lambda lab: lab not in ex_labels
                )
        except RuntimeError:
            self.fallbacks += 1
            return self.exact_query(vec, k, exclude)
        out: list[tuple[str, float]] = []
        for lab, s in zip(labels[0].tolist(), self._score(dist[0]).tolist(), strict=True):
            if lab in ex_labels:
                continue
            out.append((self._id_of[lab], s))
            if len(out) == k:
                break
        return out

    def query_arrays(self, vec: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        """``query(vec, k)`` (no exclusions) as (items, float64 scores): the same answer
        without a tuple per item (serving's retrieval)."""
        live = len(self)
        if live == 0 or k <= 0:
            return [], np.zeros(0)
        q = np.ascontiguousarray(vec, dtype=np.float32).reshape(1, self.config.dim)
        try:
            labels, dist = self._index.knn_query(q, k=min(live, k), num_threads=1)
        except RuntimeError:
            found = self.query(vec, k)
            return [item for item, _ in found], np.array([s for _, s in found], np.float64)
        id_of = self._id_of
        return ([id_of[lab] for lab in labels[0].tolist()],
                self._score(dist[0]).astype(np.float64))

    def _live_matrix(self) -> tuple[np.ndarray, list[str]]:
        if self._exact_cache is None:
            ids = list(self._label_of)
            x, _ = self.vectors(ids)
            self._exact_cache = (x, ids)
        return self._exact_cache

    def exact_query(self, vec: np.ndarray, k: int, exclude: Iterable[str] | None = None) -> list[tuple[str, float]]:
        """Exact top ``k`` by inner product over the stored vectors (for recall checks)."""
        x, ids = self._live_matrix()
        if not ids or k <= 0:
            return []
        q = np.asarray(vec, np.float32).reshape(self.config.dim)
        if self.config.space == "cosine":
            q = q / (np.linalg.norm(q) or 1.0)
        scores = x @ q
        ex = set(exclude) if exclude else set()
        pairs = heapq.nlargest(k + len(ex), range(len(ids)), key=scores.__getitem__)
        return [(ids[j], float(scores[j])) for j in pairs if ids[j] not in ex][:k]

    # --- persistence ----------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything as named arrays: hnswlib's state (``hnsw_*``), the label map, config."""
        state = self._index.__getstate__()[0]
        out = {f"hnsw_{k}": np.asarray(v) for k, v in state.items()}
        ids = list(self._label_of)
        blob, offsets = pack_strings(ids)
        out.update(
            format=np.asarray(_FORMAT),
            config=np.asarray(json.dumps(asdict(self.config))),
            labels=np.fromiter((self._label_of[i] for i in ids), np.uint64, len(ids)),
            ids_blob=blob,
            ids_offsets=offsets,
            next_label=np.asarray(self._next_label, np.uint64),
        )
        return out

    @classmethod
    def from_arrays(cls, s: dict[str, np.ndarray], frozen: bool = False) -> ItemIndex:
        if int(s["format"]) != _FORMAT:
            raise ValueError(f"unsupported index snapshot format {s['format']}")
        config = IndexConfig.from_json(str(s["config"]))
        self = cls.__new__(cls)
        self.config = config
        self.frozen = frozen
        self._exact_cache = None
        self._ids_list = None
        self.fallbacks = 0
        hs: dict[str, Any] = {}
        for k, v in s.items():
            if k.startswith("hnsw_"):
                hs[k[5:]] = v.item() if v.ndim == 0 else v
        index = hnswlib.Index.__new__(hnswlib.Index)
        index.__setstate__((hs,))
        if index.dim != config.dim or index.space != config.space:
            raise ValueError("index snapshot: hnswlib state does not match its config")
        index.set_ef(config.ef)
        index.set_num_threads(config.threads)
        self._index = index
        ids = unpack_strings(s["ids_blob"], s["ids_offsets"])
        labels = np.asarray(s["labels"]).tolist()
        if len(ids) != len(labels):
            raise ValueError("index snapshot: label map is inconsistent")
        self._label_of = dict(zip(ids, labels, strict=True))
        self._id_of = dict(zip(labels, ids, strict=True))
        self._next_label = int(s["next_label"])
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write one uncompressed ``.npz`` file (no pickled objects) to ``path`` exactly."""
        save_npz(path, self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike, frozen: bool = False) -> ItemIndex:
        """Read a file written by :meth:`save` (``frozen``: refuse writes, for serving)."""
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays({k: z[k] for k in z.files}, frozen=frozen)

    def __getstate__(self) -> dict[str, Any]:
        return {"arrays": self.to_arrays(), "frozen": self.frozen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = ItemIndex.from_arrays(state["arrays"], frozen=state["frozen"])
        self.__dict__.update(other.__dict__)


class IndexBuilder:
    """Owns the mutable index (single writer): applies item changes, publishes snapshots.

    Refresh policy per :meth:`apply` batch: incremental (mark replaced/removed nodes
    deleted, insert new vectors), or a full rebuild from the live vectors when
    ``changed / live > rebuild_fraction`` or when patching would leave
    ``deleted / slots > max_deleted_fraction``. Measured (``bench/index.py``, 100k
    items, dim 32, 2 threads): ~0.11-0.14 ms per changed item vs 8-12 s per rebuild, so
    patching stays cheaper up to ~70-80% changed; the deleted-slot bound (memory, search
    detours) is what normally triggers rebuilds, after ~43% of items changed.
    """

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.index = ItemIndex(config)
        self.rebuilds = 0
        self.incremental = 0
        self.last_published: Manifest | None = None

    def __len__(self) -> int:
        return len(self.index)

    def apply(
        self,
        upsert_ids: Sequence[str] = (),
        upsert_vectors: np.ndarray | None = None,
        remove_ids: Iterable[str] = (),
    ) -> str:
        """Remove then upsert; returns ``"rebuild"``, ``"incremental"`` or ``"noop"``.

        Rebuilds (instead of patching) when the batch changes more than
        ``rebuild_fraction`` of the live items, or when patching would leave more than
        ``max_deleted_fraction`` of the slots holding deleted nodes.
        """
        index = self.index
        ups = list(upsert_ids)
        x_up = (np.asarray(upsert_vectors, np.float32).reshape(len(ups), self.config.dim)
                if ups else np.zeros((0, self.config.dim), np.float32))
        up_set = set(ups)
        removed = [i for i in dict.fromkeys(remove_ids) if i in index and i not in up_set]
        if not ups and not removed:
            return "noop"
        live = len(index)
        replaced = sum(1 for i in up_set if i in index)
        deleted_after = index.deleted + replaced + len(removed)
        slots_after = index.slots + len(up_set)
        changed = len(removed) + len(up_set)
        if live > 0 and (
            changed / live > self.config.rebuild_fraction
            or deleted_after / slots_after > self.config.max_deleted_fraction
        ):
            drop = set(removed) | up_set
            rest = [i for i in index.item_ids() if i not in drop]
            x_rest, _ = index.vectors(rest)
            fresh = ItemIndex(self.config, capacity=max(self.config.initial_capacity,
                                                        int((len(rest) + len(up_set)) * 1.25)))
            fresh._next_label = index._next_label
            fresh.upsert(rest + ups, np.concatenate((x_rest, x_up)))
            self.index = fresh
            self.rebuilds += 1
            return "rebuild"
        index.remove(removed)
        if ups:
            index.upsert(ups, x_up)
        self.incremental += 1
        return "incremental"

    def sync(self, item_ids: Sequence[str], vectors: np.ndarray, owns: Callable[[str], bool]) -> str:
        """Make the items ``owns`` accepts exactly ``item_ids`` (e.g. one item shard's
        full resync, ``ItemChanges.full``): others of that owner are removed."""
        keep = set(item_ids)
        gone = [i for i in self.index.item_ids() if owns(i) and i not in keep]
        return self.apply(item_ids, vectors, gone)

    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray) -> str:
        return self.apply(item_ids, vectors)

    def remove(self, item_ids: Iterable[str]) -> str:
        return self.apply(remove_ids=item_ids)

    def rebuild(self) -> None:
        self.index.rebuild()
        self.rebuilds += 1

    def publish(self, store: SnapshotStore, ts_ms: int) -> Manifest:
        """Write the index as a new immutable version of kind ``index``; ``ts_ms`` is
        the event time (ms) it reflects. Returns the manifest (announce it)."""
        counts = {"items": len(self.index), "slots": self.index.slots,
                  "deleted": self.index.deleted, "dim": self.config.dim}
        manifest = store.write(KIND, "npz", self.index.save, ts_ms, counts)
        self.last_published = manifest
        return manifest

    def query(self, vec: np.ndarray, k: int, exclude: Iterable[str] | None = None) -> list[tuple[str, float]]:
        """Query the builder's own index (same thread as the writes only)."""
        return self.index.query(vec, k, exclude)


def load_frozen(path: Path) -> ItemIndex:
    """SnapshotReader loader: a read-only :class:`ItemIndex` from a verified file."""
    return ItemIndex.load(path, frozen=True)


class IndexReader:
    """Serving side: the newest verified index snapshot, hot-swapped without blocking queries.

    ``offer``/``refresh`` load in the calling thread (serialised by a lock that queries
    never take); ``offer_async`` loads on a background thread. A refused snapshot
    (missing, altered, unreadable) leaves the current version serving.
    Pickles as (store root, manifest) and reloads on unpickle, so it can sit inside
    flow state without copying the index into every recovery snapshot.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = SnapshotStore(tmp.name)
    >>> builder = IndexBuilder(IndexConfig(dim=2, threads=1))
    >>> builder.upsert(["a", "b"], np.eye(2, dtype=np.float32))
    'incremental'
    >>> builder.publish(store, ts_ms=1_700_000_000_000)["version"]
    1
    >>> reader = IndexReader(store)
    >>> reader.refresh(), reader.version, reader.query(np.array([0, 1], np.float32), k=1)
    (True, 1, [('b', 1.0)])
    >>> reader.close(); tmp.cleanup()
    """

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self._init()

    def _init(self) -> None:
        self._reader: SnapshotReader[ItemIndex] = SnapshotReader(self.store, KIND, load_frozen)
        self._live: tuple[Manifest, ItemIndex] | None = None
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def version(self) -> int | None:
        live = self._live
        return live[0]["version"] if live else None

    @property
    def manifest(self) -> Manifest | None:
        live = self._live
        return live[0] if live else None

    @property
    def index(self) -> ItemIndex | None:
        live = self._live
        return live[1] if live else None

    @property
    def refused(self) -> int:
        return self._reader.refused

    @property
    def last_error(self) -> str | None:
        return self._reader.last_error

    def offer(self, manifest: Manifest) -> bool:
        """Load ``manifest`` if newer and verified; True when it became current."""
        with self._lock:
            if not self._reader.offer(manifest):
                return False
            assert self._reader.manifest is not None and self._reader.current is not None
            self._live = (self._reader.manifest, self._reader.current)
            return True

    @property
    def reader(self) -> SnapshotReader[ItemIndex]:
        """The underlying reader: ``candidates`` and ``prepare`` for loading off-thread."""
        return self._reader

    def install(self, manifest: Manifest, index: ItemIndex) -> None:
        """Make a prepared version (``reader.prepare``) current."""
        with self._lock:
            self._reader.install(manifest, index)
            self._live = (manifest, index)

    def refresh(self, max_ts: int | None = None) -> bool:
        """Offer the store's LATEST index manifest (see ``SnapshotReader.refresh``)."""
        return any(self.offer(m) for m in self._reader.candidates(max_ts))

    def offer_async(self, manifest: Manifest) -> Future[bool]:
        """Load in the background; queries keep using the current version meanwhile."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-load")
        return self._executor.submit(self.offer, manifest)

    def query(self, vec: np.ndarray, k: int, exclude: Iterable[str] | None = None) -> list[tuple[str, float]]:
        """Top ``k`` items from the current snapshot (empty before the first one)."""
        live = self._live
        return live[1].query(vec, k, exclude) if live else []

    def query_arrays(self, vec: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        """``query(vec, k)`` as (items, scores) arrays (``ItemIndex.query_arrays``)."""
        live = self._live
        return live[1].query_arrays(vec, k) if live else ([], np.zeros(0))

    def vectors(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Item vectors from the current snapshot: ``(vectors, found)`` (stale by design)."""
        live = self._live
        if live is None:
            return np.zeros((len(item_ids), 0), np.float32), np.zeros(len(item_ids), bool)
        return live[1].vectors(item_ids)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` random items of the current snapshot (empty before the first one)."""
        live = self._live
        return live[1].sample(n, rng) if live else []

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.store.root), "keep": self.store.keep, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.store = SnapshotStore(state["root"], keep=state["keep"])
        self._init()
        manifest = state["manifest"]
        if manifest is not None and not self.offer(manifest):
            self.refresh()
