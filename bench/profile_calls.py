"""Profile-store calls of a replay, recorded once and replayed alone (e.g. under valgrind).

``record LOG CALLS [-n EVENTS]`` feeds LOG's first ``n`` events through the in-process
flow (``serving_cpu.replay``) and pickles every ``ProfileStore`` call to CALLS: each
store's specs, kind and parameters, then ``apply`` (with the item attributes the call
read), ``query_key``, ``query_keys``, ``knows``, ``advance``, ``flush`` and ``snapshot``
in order. ``replay CALLS [--digest]`` applies them to fresh stores (no other stage is
imported, so no hnswlib: ``valgrind --tool=callgrind`` runs it) and prints the process
CPU seconds; ``--digest`` adds a sha256 over every answer and each store's final
``snapshot()`` and ``stats()``: equal digests, equal store behaviour bit for bit. The last
line is JSON: ``calls``, ``stores`` and, for ``replay``, ``cpu_s`` and ``digest`` (null
without ``--digest``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from state.profiles import ProfileStore

Call = tuple[int, str, tuple[Any, ...]]
"""(store index, method name, arguments); ``__init__`` carries (specs, kind, params)."""
_RECORDED = ("apply", "query_key", "query_keys", "knows", "advance", "flush", "snapshot")


def record(log: Path, n: int) -> list[Call]:
    """Every ProfileStore call of ``serving_cpu.replay(log, n)``, in order."""
    from serving_cpu import replay  # the whole flow: imported only to record

    calls: list[Call] = []
    index: dict[int, int] = {}
    originals = {name: getattr(ProfileStore, name) for name in ("__init__", *_RECORDED)}

    def init(self: ProfileStore, *args: Any, **kwargs: Any) -> None:
        originals["__init__"](self, *args, **kwargs)
        index[id(self)] = len(index)
        specs = [s.to_dict() for s in self.plan.all_specs]
        calls.append((index[id(self)], "__init__", (specs, self.entity_kind, self.params.to_dict())))

    def recorder(name: str) -> Callable[..., Any]:
        method = originals[name]

        def call(self: ProfileStore, *args: Any) -> Any:
            if name == "apply" and len(args) > 1 and args[1] is not None:
                read: list[Any] = []
                attrs = args[1]

                def item_attrs(item_id: Any) -> Any:
                    read.append(attrs(item_id))
                    return read[-1]
                out = method(self, args[0], item_attrs)
                calls.append((index[id(self)], name, (args[0], read)))
                return out
            out = method(self, *args)
            calls.append((index[id(self)], name, args))
            return out
        return call

    ProfileStore.__init__ = init  # type: ignore[method-assign]
    for name in _RECORDED:
        setattr(ProfileStore, name, recorder(name))
    try:
        replay(log, n)
    finally:
        for name, method in originals.items():
            setattr(ProfileStore, name, method)
    return calls


def play(calls: list[Call], digest: bool) -> str | None:
    """Apply ``calls`` to fresh stores; the sha256 of the answers and final states, or
    None when ``digest`` is off."""
    stores: dict[int, ProfileStore] = {}
    h = hashlib.sha256()
    for idx, name, args in calls:
        if name == "__init__":
            specs, kind, params = args
            stores[idx] = ProfileStore(specs, kind, **params)
            continue
        store = stores[idx]
        if name == "apply" and len(args) == 2:
            event, read = args
            answers: Iterator[Any] = iter(read)
            store.apply(event, lambda _item, it=answers: next(it))
            continue
        out = getattr(store, name)(*args)
        if digest:
            h.update(repr(out).encode())
    if not digest:
        return None
    for store in stores.values():
        h.update(repr(store.snapshot()).encode())
        h.update(repr(store.stats()).encode())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("log", type=Path)
    rec.add_argument("calls", type=Path)
    rec.add_argument("-n", type=int, default=20_000, help="events to replay")
    rep = sub.add_parser("replay")
    rep.add_argument("calls", type=Path)
    rep.add_argument("--digest", action="store_true")
    args = parser.parse_args()
    if args.mode == "record":
        calls = record(args.log, args.n)
        args.calls.write_bytes(pickle.dumps(calls, protocol=5))
        stores = sum(c[1] == "__init__" for c in calls)
        print(f"{len(calls):,} calls of {stores} stores")
        print(json.dumps({"calls": len(calls), "stores": stores}))
        return
    gc.disable()  # the recorded calls are a large heap: collections would dominate
    calls = pickle.loads(args.calls.read_bytes())
    cpu0 = time.process_time()
    digest = play(calls, args.digest)
    cpu_s = time.process_time() - cpu0
    print(f"{len(calls):,} calls in {cpu_s:.3f} s CPU" + (f"; digest {digest}" if digest else ""))
    print(json.dumps({"calls": len(calls), "stores": sum(c[1] == "__init__" for c in calls),
                      "cpu_s": round(cpu_s, 3), "digest": digest}))


if __name__ == "__main__":
    main()
