"""CPU of the item shards on the zero-config workload, this checkout beside a rival one.

The item updates of an ``-n``-event zero-config run (the simulator world of
``InputConfig``'s defaults, driven in process by ``flows.inprocess.InProcessFlow``, one
micro-batch per 1,000 events) are captured once (cached in the temp dir), then replayed
into fresh ``ItemShard``s of the default config, publishing item tables on their event-time
schedule and at the end. Each side runs in its own process (``--rival DIR``: the same
replay with ``PYTHONPATH=DIR``, e.g. /work/main), so both import their own code.

Figures: ``item_cpu_s`` / ``item_wall_s`` (process CPU / wall seconds of the replay, this
checkout), ``rival_item_cpu_s`` / ``rival_item_wall_s``, ``speedup`` / ``speedup_wall``
(rival / this; wall includes the snapshot store's fsyncs), ``publishes``, and ``tables_equal``: every published table
of both sides holds the same arrays (bitwise).

Usage: ``python bench/item_shard.py [-n EVENTS] [--rival DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import zero_config_world  # noqa: E402

from flows.config import load_config  # noqa: E402

from common import CACHE, simulated_log  # noqa: E402


def capture(n: int) -> Path:
    """The item shards' inputs of an ``n``-event zero-config run: a pickled list of
    ``(shard key, updates)`` in call order (cached)."""
    path = CACHE / f"item-updates-{n}.pkl"
    if path.exists():
        return path
    from flows.inprocess import InProcessFlow
    from operators.item_shard import ItemShard

    world, seed, _ = zero_config_world()
    log = simulated_log(n, seed, world)
    calls: list[tuple[str, list[Any]]] = []
    original = ItemShard.process

    def recording(self: ItemShard, shard: str, updates: list[Any], batch: Any = None) -> Any:
        calls.append((shard, list(updates)))
        return original(self, shard, updates, batch)

    ItemShard.process = recording  # type: ignore[method-assign]
    flow = InProcessFlow()
    try:
        batch: list[dict[str, Any]] = []
        with log.open("rb") as f:
            for line in f:
                if line.strip():
                    batch.append(orjson.loads(line))
                if len(batch) == 1000:
                    flow.feed(batch)
                    batch = []
        if batch:
            flow.feed(batch)
    finally:
        ItemShard.process = original  # type: ignore[method-assign]
        flow.close()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        pickle.dump(calls, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.rename(path)
    return path


def replay(calls_path: Path) -> dict[str, Any]:
    """Replay the captured calls into fresh shards; CPU seconds and a digest per table."""
    from operators.item_shard import ItemShard
    from state.snapshot_store import SnapshotStore

    with calls_path.open("rb") as f:
        calls = pickle.load(f)
    cfg = load_config(None)
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-items-") as root:
        store = SnapshotStore(Path(root) / cfg.app, keep=1_000_000)
        shards: dict[str, ItemShard] = {}
        cpu, wall = time.process_time(), time.perf_counter()
        for key, updates in calls:
            shard = shards.get(key)
            if shard is None:
                shard = shards[key] = ItemShard(cfg.items, store, cfg.features,
                                                hot_profiles=cfg.shards.hot_profiles)
            shard.process(key, updates)
        for shard in shards.values():
            shard.finish()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        digests = {}
        for path in sorted(Path(root).rglob("*.npz")):
            with np.load(path, allow_pickle=False) as data:
                h = hashlib.sha256()
                for name in sorted(data.files):
                    arr = data[name]
                    h.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode())
                    h.update(np.ascontiguousarray(arr).tobytes())
            digests[str(path.relative_to(root))] = h.hexdigest()
    return {"cpu_s": cpu, "wall_s": wall, "digests": digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--rival", help="a checkout whose code replays the same updates")
    parser.add_argument("--replay", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:  # the rival's side: one JSON line on stdout
        print(orjson.dumps(replay(Path(args.replay))).decode())
        return
    calls = capture(args.n)
    ours = replay(calls)
    figures: dict[str, Any] = {"events": args.n, "item_cpu_s": round(ours["cpu_s"], 3),
                               "item_wall_s": round(ours["wall_s"], 3),
                               "publishes": len(ours["digests"])}
    print(f"this checkout: {ours['cpu_s']:.2f} s CPU, {ours['wall_s']:.2f} s wall, "
          f"{len(ours['digests'])} tables")
    if args.rival:
        env = {**os.environ, "PYTHONPATH": args.rival}
        out = subprocess.run([sys.executable, str(Path(args.rival) / "bench" / "item_shard.py")
                              if (Path(args.rival) / "bench" / "item_shard.py").exists()
                              else __file__, "--replay", str(calls)],
                             env=env, check=True, capture_output=True, text=True).stdout
        rival = orjson.loads(out.strip().splitlines()[-1])
        print(f"rival {args.rival}: {rival['cpu_s']:.2f} s CPU, {rival['wall_s']:.2f} s wall, "
              f"{len(rival['digests'])} tables")
        figures.update(rival_item_cpu_s=round(rival["cpu_s"], 3),
                       rival_item_wall_s=round(rival["wall_s"], 3),
                       speedup=round(rival["cpu_s"] / ours["cpu_s"], 3),
                       speedup_wall=round(rival["wall_s"] / ours["wall_s"], 3),
                       tables_equal=rival["digests"] == ours["digests"])
    print(orjson.dumps(figures).decode())


if __name__ == "__main__":
    main()
