"""Benchmark: collisionless EmbeddingTable vs a Python dict of arrays vs River FM's latent store.

Run from the project root: ``python bench/embedding_table.py [--ids N] [--dim D] [--batch B]``.
Defaults: 1M random uint64 IDs x 32 float32 dims, batches of 4096.

What is measured (same IDs, same batches, same process):

* insert: new IDs arriving in batches, each getting a deterministic initial vector.
  Table: ``insert(batch, now_ms)``. Dict: ``d[id] = vector`` per ID (vectors from the
  same vectorized initializer). River: ``fm.latents[name]`` / ``fm.weights[name]`` (the
  defaultdicts ``FMClassifier`` fills on first sight of a one-hot feature ``item_<id>``).
* lookup: ``gather`` of shuffled batches of existing IDs into a ``(batch, dim)`` array.
  Dict: ``np.stack([d.get(id, zeros) ...])``. River: ``np.stack([latents[name] ...])``
  with the feature names prebuilt (which favours River).
* memory: table = ``EmbeddingTable.memory()["table"]`` (embedding matrix + cuckoo index
  + per-row time/count/owner key), cross-checked with tracemalloc on a restore; the
  Adagrad slots (a separate ``(rows, dim)`` matrix) are reported apart. Dict and River:
  ``sys.getsizeof`` summed over the container, every key and every value (arrays own
  their data, so their getsizeof includes it).
* snapshot: table ``snapshot()`` (array copies) vs an independent copy of the dict
  (``{k: v.copy()}``); pickling time of each store is printed too (Bytewax pickles state).

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from state.embedding_table import EmbeddingTable  # noqa: E402


def _sizeof_mapping(m: dict) -> int:
    """getsizeof of a dict plus every key and value in it (values must not share memory)."""
    return sys.getsizeof(m) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in m.items())


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_table(ids: np.ndarray, dim: int, batch: int, lookup_order: np.ndarray) -> dict:
    n = ids.size
    table = EmbeddingTable(dim, max_rows=n, optimizer="adagrad")
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        table.insert(ids[i : i + batch], now_ms=1_000 + i)
    insert_s = time.perf_counter() - t0
    assert len(table) == n

    probe = ids[lookup_order]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        out = table.gather(probe[i : i + batch])
    gather_s = time.perf_counter() - t0
    assert out.shape == (min(batch, n - (n - 1) // batch * batch), dim)

    t0 = time.perf_counter()
    for i in range(0, n, batch):
        table.lookup(probe[i : i + batch])
    lookup_s = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    grads = rng.normal(size=(batch, dim)).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        chunk = probe[i : i + batch]
        table.apply_gradients(chunk, grads[: chunk.size], now_ms=10_000_000, lr=0.01)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    snap = table.snapshot()
    snapshot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = EmbeddingTable.restore(snap)
    restore_s = time.perf_counter() - t0
    assert restored == table
    del restored
    t0 = time.perf_counter()
    blob = pickle.dumps(table, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - t0
    pickle_bytes = len(blob)
    del blob

    # cross-check the nbytes accounting with tracemalloc (numpy reports its buffers to it)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    restored = EmbeddingTable.restore(snap)
    traced = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    restored_mem = restored.memory()
    del restored, snap
    mem = table.memory()
    return {
        "insert_s": insert_s,
        "gather_s": gather_s,
        "lookup_s": lookup_s,
        "train_s": train_s,
        "snapshot_s": snapshot_s,
        "restore_s": restore_s,
        "pickle_s": pickle_s,
        "pickle_bytes": pickle_bytes,
        "mem": mem,
        "traced_bytes": traced,
        "restored_accounted_bytes": sum(restored_mem.values()),
        "stats": table.stats(),
        "initial_vectors": table.initial_vectors,
    }


def bench_dict(ids: np.ndarray, dim: int, batch: int, lookup_order: np.ndarray, init) -> dict:
    n = ids.size
    store: dict[int, np.ndarray] = {}
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        chunk = ids[i : i + batch]
        vecs = init(chunk)
        for k, v in zip(chunk.tolist(), vecs, strict=True):
            store[k] = v.copy()  # each ID owns its vector, as a per-key store must
    insert_s = time.perf_counter() - t0

    probe = ids[lookup_order].tolist()
    zeros = np.zeros(dim, np.float32)
    get = store.get
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        out = np.stack([get(k, zeros) for k in probe[i : i + batch]])
    gather_s = time.perf_counter() - t0
    assert out.shape[1] == dim

    t0 = time.perf_counter()
    copied = {k: v.copy() for k, v in store.items()}
    snapshot_s = time.perf_counter() - t0
    del copied
    t0 = time.perf_counter()
    blob = pickle.dumps(store, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - t0
    del blob
    nbytes = _sizeof_mapping(store)
    del store
    gc.collect()
    return {
        "insert_s": insert_s,
        "gather_s": gather_s,
        "snapshot_s": snapshot_s,
        "pickle_s": pickle_s,
        "bytes": nbytes,
    }


def bench_river(ids: np.ndarray, dim: int, batch: int, lookup_order: np.ndarray) -> dict:
    from river import facto

    n = ids.size
    fm = facto.FMClassifier(n_factors=dim, seed=0)
    latents, weights = fm.latents, fm.weights
    names = [f"item_{k}" for k in ids.tolist()]  # FM's one-hot feature name for {"item": id}
    t0 = time.perf_counter()
    for name in names:
        latents[name]  # defaultdict: draws Normal(0, 0.1) latents on first access
        weights[name]
    insert_s = time.perf_counter() - t0

    probe = [names[j] for j in lookup_order.tolist()]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        out = np.stack([latents[name] for name in probe[i : i + batch]])
    gather_s = time.perf_counter() - t0
    assert out.shape[1] == dim

    t0 = time.perf_counter()
    blob = pickle.dumps((latents, weights), protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.perf_counter() - t0
    del blob
    nbytes = _sizeof_mapping(latents) + _sizeof_mapping(weights)
    dtype = next(iter(latents.values())).dtype
    del fm, latents, weights, names, probe
    gc.collect()
    return {
        "insert_s": insert_s,
        "gather_s": gather_s,
        "pickle_s": pickle_s,
        "bytes": nbytes,
        "dtype": str(dtype),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args()
    n, dim, batch = args.ids, args.dim, args.batch

    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**64, int(n * 1.01) + 16, dtype=np.uint64))
    ids = rng.permutation(ids)[:n]  # n distinct random 64-bit IDs, in arrival order
    lookup_order = rng.permutation(n)
    raw = 4 * dim

    print(f"# embedding table bench: {n:,} IDs x {dim} float32, batches of {batch}")
    tb = bench_table(ids, dim, batch, lookup_order)
    dc = bench_dict(ids, dim, batch, lookup_order, tb.pop("initial_vectors"))
    rv = bench_river(ids, dim, batch, lookup_order)

    mem = tb["mem"]
    bpi = mem["table"] / n
    slot_bpi = mem["slots"] / n
    traced_bpi = tb["traced_bytes"] / n
    dict_bpi = dc["bytes"] / n
    river_bpi = rv["bytes"] / n
    look = _rate(n, tb["gather_s"])
    dict_look = _rate(n, dc["gather_s"])
    river_look = _rate(n, rv["gather_s"])
    ins = _rate(n, tb["insert_s"])
    dict_ins = _rate(n, dc["insert_s"])
    river_ins = _rate(n, rv["insert_s"])
    goal_bytes = 1.25 * raw + 32

    st = tb["stats"]
    print(
        f"table: index {st['index_slots']:,} slots (load {st['load_factor']:.3f}), "
        f"{st['index_growths']} index growths while inserting"
    )
    print(
        f"memory  (bytes/ID)  raw {raw}  table {bpi:.1f} (goal <= {goal_bytes:.0f}; embeddings "
        f"+ index + time/count/key)  + adagrad slots {slot_bpi:.1f}  | tracemalloc of a restored "
        f"table (table + slots) {traced_bpi:.1f} vs accounted {tb['restored_accounted_bytes'] / n:.1f}"
    )
    print(
        f"                    dict {dict_bpi:.1f}  river FM ({rv['dtype']} latents + weights) "
        f"{river_bpi:.1f}  | dict/table {dict_bpi / bpi:.2f}x  river/table {river_bpi / bpi:.2f}x"
    )
    print(
        f"gather  (keys/s)    table {look:,.0f} (goal >= 2,000,000; lookup-only "
        f"{_rate(n, tb['lookup_s']):,.0f})  dict {dict_look:,.0f}  river {river_look:,.0f}  "
        f"| table/dict {look / dict_look:.1f}x  table/river {look / river_look:.1f}x"
    )
    print(
        f"insert  (keys/s)    table {ins:,.0f}  dict {dict_ins:,.0f}  river {river_ins:,.0f}  "
        f"| table/dict {ins / dict_ins:.1f}x"
    )
    print(f"train   (keys/s)    table apply_gradients (Adagrad) {_rate(n, tb['train_s']):,.0f}")
    print(
        f"snapshot (s)        table {tb['snapshot_s']:.3f} (goal < 1; restore "
        f"{tb['restore_s']:.3f})  dict copy {dc['snapshot_s']:.3f}  "
        f"| dict/table {dc['snapshot_s'] / tb['snapshot_s']:.1f}x"
    )
    print(
        f"pickle  (s)         table {tb['pickle_s']:.3f} ({tb['pickle_bytes'] / n:.0f} B/ID incl. "
        f"slots)  dict {dc['pickle_s']:.3f}  river {rv['pickle_s']:.3f}"
    )
    result = {
        "ids": n,
        "dim": dim,
        "batch": batch,
        "bytes_per_id": round(bpi, 2),
        "raw_bytes_per_id": raw,
        "slot_bytes_per_id": round(slot_bpi, 2),
        "traced_bytes_per_id": round(traced_bpi, 2),
        "dict_bytes_per_id": round(dict_bpi, 2),
        "river_bytes_per_id": round(river_bpi, 2),
        "lookups_per_s": round(look),
        "dict_lookups_per_s": round(dict_look),
        "river_lookups_per_s": round(river_look),
        "inserts_per_s": round(ins),
        "dict_inserts_per_s": round(dict_ins),
        "river_inserts_per_s": round(river_ins),
        "train_per_s": round(_rate(n, tb["train_s"])),
        "snapshot_s": round(tb["snapshot_s"], 4),
        "restore_s": round(tb["restore_s"], 4),
        "dict_snapshot_s": round(dc["snapshot_s"], 4),
        "pickle_s": round(tb["pickle_s"], 4),
        "dict_pickle_s": round(dc["pickle_s"], 4),
        "river_pickle_s": round(rv["pickle_s"], 4),
        "dict_over_table_bytes": round(dict_bpi / bpi, 3),
        "river_over_table_bytes": round(river_bpi / bpi, 3),
        "table_over_dict_lookups": round(look / dict_look, 3),
        "table_over_river_lookups": round(look / river_look, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
