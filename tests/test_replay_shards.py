"""A replay log read as one partition per user shard (operators/replay_shards.py): every
shard gets exactly the events, order and micro-batches of the one-partition source, each
line is counted and dead-lettered once, and Bytewax runs partition j on user shard j's
worker."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from bytewax.testing import cluster_main

from events.model import EventParser, Item
from flows.recsys import build
from operators.placement import worker_of
from operators.replay_shards import (
    ParsedShardBatch,
    ShardedReplaySource,
    line_user,
    parse_shard_batch,
    parse_window,
    split_window,
)
from operators.sources import ReplaySource, _ReplayPartition
from operators.user_shard import UserShard, route_events, shard_key
from state.hashing import ShardOf

T0 = 1_767_225_600_000
SHARDS = 4


def _log(path: Path) -> list[bytes]:
    """Users' events in the compact and the spaced spelling, item events, lines that need
    parsing to know their user, and bad lines."""
    lines: list[bytes] = []
    for i in range(300):
        ts = T0 + i * 10
        user = f"u{i % 37}"
        kind = i % 6
        if kind == 0:
            lines.append(orjson.dumps({"type": "item", "ts": ts, "item_id": f"i{i}",
                                       "attrs": {"category": "c1", "user_id": "u5"}}))
        elif kind == 1:
            lines.append(json.dumps({"type": "request", "ts": ts, "request_id": f"r{i}",
                                     "user_id": user}).encode())  # '": "' spacing
        elif kind == 2:  # context names a user and a type: needs parsing
            lines.append(orjson.dumps({"ts": ts, "context": {"type": "user", "user_id": "u9"},
                                       "type": "impression", "impression_id": f"m{i}",
                                       "user_id": user, "item_id": "i1"}))
        elif kind == 3:
            lines.append(orjson.dumps({"type": "user", "ts": ts, "user_id": f"\u00e9{user}\\x"}))
        elif kind == 4:
            lines.append(b'{"type":"feedback","user_id":"' + user.encode() + b'", "ts":'
                         + str(ts).encode() + b',"item_id":"i1","action":"click"}')
        else:
            lines.append(b'{"type":"request","user_id":"u3","ts": oops' if i % 12 == 5
                         else b'{"type":"nonsense","user_id":"u4","ts":1}' if i % 18 == 11
                         else b'[1, 2]')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


def _batches(part: _ReplayPartition) -> list[list]:
    out = []
    while True:
        try:
            out.extend(part.next_batch())
        except StopIteration:
            return out


def _round_robin(parts: list) -> list:
    """Every batch of ``parts``, polled in turn as one Bytewax worker does, until all end."""
    out, live = [], list(parts)
    while live:
        for part in list(live):
            try:
                out.extend(part.next_batch())
            except StopIteration:
                live.remove(part)
                part.close()
    return out


def test_line_user_reads_only_what_is_certain() -> None:
    assert line_user(b'{"type":"impression","ts":1,"user_id":"u7","item_id":"a"}') == "u7"
    assert line_user(b'{"ts":1, "user_id" : "u7", "type": "request"}') == "u7"
    assert line_user(b'{"type":"item","item_id":"a","attrs":{"user_id":"u7"}}') is None
    assert line_user(b'{"type":"request","user_id":"u\\u0037"}') is None  # escape
    assert line_user(b'{"type":"request","user_id":"u7","context":{"user_id":"x"}}') is None
    assert line_user(b'{"type":"request","user_id":"u7","context":{"type":"item"}}') is None
    assert line_user(b'{"type":"request","user_id":7}') is None
    assert line_user({"type": "request", "user_id": "u7"}) is None
    assert line_user(b'{"type" :\t"user","user_id":\t"u7"}') == "u7"
    assert line_user(b'{"type":"users","user_id":"u7"}') is None  # not a user event type
    assert line_user(b'{"type":"user\\"","user_id":"u7"}') is None
    assert line_user(b'{"type":"user","user_id":"u7\xff"}') is None  # not UTF-8
    assert line_user(b'{"type":"user","user_id":"u7}') is None  # no closing quote


@pytest.mark.parametrize("batch_size", [7, 64])
def test_shards_get_the_one_partition_events_in_the_same_batches(tmp_path: Path,
                                                                 batch_size: int) -> None:
    path = tmp_path / "log.jsonl"
    _log(path)
    shard_of = ShardOf(SHARDS)
    sharded = ShardedReplaySource(path, SHARDS, shard_of, batch_size=batch_size)
    parts = sharded.list_parts()
    assert parts == sorted(parts) and len(parts) == SHARDS

    # the one-partition source: each window parsed and routed to the shards
    one = ReplaySource(path, batch_size=batch_size)
    expected: dict[str, list[list]] = defaultdict(list)
    parser = EventParser()
    all_dead, all_events = [], Counter()
    for window in _batches(one.build_part("in", one.list_parts()[0], None)):
        events, dead = parser.parse_batch(window)
        all_dead += dead
        all_events.update(e.type for e in events)
        for key, (_, batch, _) in route_events(events, SHARDS, shard_of, 0):
            expected[key].append(batch)

    got: dict[str, list[list]] = defaultdict(list)
    got_dead, got_events = [], Counter()
    parser = EventParser()
    for batch in _round_robin([sharded.build_part("in", name, None) for name in parts]):
        if True:
            events, dead, copies = parse_shard_batch(parser, batch, shard_of)
            got_dead += dead
            got_events.update(e.type for e in events)
            got_events["item"] -= copies
            for key, (_, routed, _) in route_events(events, SHARDS, shard_of, 0, batch.shard):
                assert key == shard_key(batch.shard)  # nothing crosses to another shard
                got[key].append(routed)
    assert got == expected
    assert got_events == all_events  # each line counted once
    assert sorted(d["raw"] for d in got_dead) == sorted(d["raw"] for d in all_dead)
    assert any(isinstance(e, Item) for batches in got.values() for b in batches for e in b)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_a_window_parsed_once_equals_split_then_parsed(tmp_path: Path, batch_size: int) -> None:
    """``parse_window`` (one parse of the window in log order) gives each shard the events,
    dead letters and copies that ``split_window`` then ``parse_shard_batch`` give it."""
    path = tmp_path / "log.jsonl"
    lines = _log(path)
    lines.insert(3, b'{"type":"impression","ts":1,"impression_id":"m","user_id":"u3","item_id":"i"}')
    shard_of = ShardOf(SHARDS)
    once, split = EventParser(), EventParser()
    for i in range(0, len(lines), batch_size):
        window = lines[i:i + batch_size]
        parsed = parse_window(window, once, range(SHARDS), shard_of)
        for shard, part in split_window(window, range(SHARDS), shard_of).items():
            events, dead, copies = parse_shard_batch(split, part, shard_of)
            got = parsed[shard]
            assert isinstance(got, ParsedShardBatch) and got.shard == shard
            assert got.events == events and got.copies == copies
            assert [(d["reason"], d["raw"]) for d in got.dead] == [(d["reason"], d["raw"])
                                                                   for d in dead]
            assert bool(got) == bool(events or dead)


def test_one_process_flow_parses_in_the_reader(tmp_path: Path, monkeypatch) -> None:
    """A one-process replay of every shard parses each line once, in the reader (no
    ``line_user`` scan but of dead lines, no parse in the flow's step): the flow's
    outputs are those of the split windows parsed in the step."""
    from operators import replay_shards

    path = tmp_path / "log.jsonl"
    lines = _log(path)
    outs = {}
    for name in ("split", "once"):
        looked = Counter()
        real = replay_shards.line_user
        monkeypatch.setattr(replay_shards, "line_user",
                            lambda line, looked=looked, real=real: looked.update([line]) or real(line))
        if name == "split":
            monkeypatch.setattr(replay_shards, "parse_window", None)  # fails if called
            real_init = ShardedReplaySource.__init__

            def no_parser(self, *args, real_init=real_init, **kwargs):  # noqa: ANN001, ANN202
                real_init(self, *args, **kwargs)
                self.parser = None

            monkeypatch.setattr(ShardedReplaySource, "__init__", no_parser)
        out = tmp_path / name
        flow = build({"inputs": [{"kind": "replay", "path": str(path), "batch_size": 50}],
                      "shards": {"users": SHARDS, "items": 2}, "output": {"dir": str(out)},
                      "snapshots": {"dir": str(tmp_path / f"snap-{name}")}})
        from bytewax.testing import run_main

        run_main(flow)
        monkeypatch.undo()
        outs[name] = {f: (out / f"{f}.jsonl").read_bytes()
                      for f in ("examples", "late-labels", "recommendations")
                      if (out / f"{f}.jsonl").exists()}
        outs[name]["dead"] = sorted(orjson.loads(line)["raw"] for line in
                                    (out / "dead-letters.jsonl").read_bytes().splitlines())
        summary = [m for m in map(orjson.loads, (out / "metrics.jsonl").read_bytes().splitlines())
                   if m["kind"] == "summary"][0]
        outs[name]["counts"] = (summary["events_in"], summary["events_by_type"],
                                summary["dead_by_reason"])
        if name == "once":
            assert sum(looked.values()) < len(lines) / 4  # dead lines only
        else:
            assert sum(looked.values()) == len(lines)
    assert outs["once"]["counts"][0] == len(lines)
    assert outs["once"].keys() == outs["split"].keys()
    assert outs["once"]["examples"] and outs["once"]["recommendations"]
    for key in outs["once"].keys() - {"recommendations"}:
        assert outs["once"][key] == outs["split"][key], key
    drop = ("latency_ms", "cpu_ms", "queue_ms")
    recs = [[{k: v for k, v in orjson.loads(line).items() if k not in drop}
             for line in outs[name]["recommendations"].splitlines()] for name in outs]
    assert recs[0] == recs[1]


def test_resume_continues_each_partition(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    _log(path)
    source = ShardedReplaySource(path, SHARDS, ShardOf(SHARDS), batch_size=16)
    name = source.list_parts()[2]
    whole = _batches(source.build_part("in", name, None))
    first = source.build_part("in", name, None)
    head = first.next_batch() + first.next_batch() + first.next_batch()
    resumed = source.build_part("in", name, first.snapshot())
    assert [list(b) for b in head + _batches(resumed)] == [list(b) for b in whole]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_one_partition(tmp_path: Path) -> None:
    fifo = tmp_path / "log.pipe"
    os.mkfifo(fifo)
    assert ShardedReplaySource(fifo, SHARDS, ShardOf(SHARDS)).list_parts() == [f"replay:{fifo}"]


@pytest.mark.parametrize("workers", [2, 3])
def test_flow_reads_each_shard_on_its_worker(tmp_path: Path, workers: int) -> None:
    """The real flow on a cluster of ``workers`` workers: the replay partition of user
    shard j is built on the worker that runs user shard j, and every event is counted."""
    path = tmp_path / "log.jsonl"
    lines = _log(path)
    built: dict[int, set[int]] = defaultdict(set)
    ran: dict[int, set[str]] = defaultdict(set)
    build_part, process = ShardedReplaySource.build_part, UserShard.process

    def record_part(self, step_id, for_part, resume_state):  # noqa: ANN001, ANN202
        built[threading.get_ident()].add(int(for_part.rsplit("#", 1)[1]))
        return build_part(self, step_id, for_part, resume_state)

    def record_shard(self, shard, *args, **kwargs):  # noqa: ANN001, ANN202
        ran[threading.get_ident()].add(shard)
        return process(self, shard, *args, **kwargs)

    ShardedReplaySource.build_part = record_part  # type: ignore[method-assign]
    UserShard.process = record_shard  # type: ignore[method-assign]
    try:
        out = tmp_path / "out"
        flow = build({"inputs": [{"kind": "replay", "path": str(path), "batch_size": 50}],
                      "shards": {"users": 6, "items": 2}, "output": {"dir": str(out)},
                      "snapshots": {"dir": str(tmp_path / "snap")}})
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    finally:
        ShardedReplaySource.build_part = build_part  # type: ignore[method-assign]
        UserShard.process = process  # type: ignore[method-assign]
    assert sorted(j for parts in built.values() for j in parts) == list(range(6))
    for thread, parts in built.items():
        assert {shard_key(j) for j in parts} >= ran[thread]
        assert {worker_of(shard_key(j), workers) for j in parts} == {min(parts) % workers}
    summary = [m for m in map(orjson.loads, (out / "metrics.jsonl").read_bytes().splitlines())
               if m["kind"] == "summary"]
    assert summary[0]["events_in"] == len(lines)


def test_partitions_of_a_process_share_one_reader(tmp_path: Path, monkeypatch) -> None:
    """Each line is read and looked at once per process, not once per partition; a
    partition far ahead waits for the others (at most ``MAX_AHEAD`` windows held)."""
    from operators import replay_shards

    path = tmp_path / "log.jsonl"
    lines = _log(path)
    looked = Counter()
    real = replay_shards.line_user
    monkeypatch.setattr(replay_shards, "line_user", lambda line: looked.update([line]) or real(line))
    monkeypatch.setattr(replay_shards, "MAX_AHEAD", 3)
    source = ShardedReplaySource(path, SHARDS, ShardOf(SHARDS), batch_size=10)
    parts = [source.build_part("in", name, None) for name in source.list_parts()]
    ahead = [parts[0].next_batch() for _ in range(6)]
    assert all(ahead[:3]) and not any(ahead[3:])  # held at 3 windows until the rest move
    assert len(source._shared.windows) == 3
    _round_robin(parts)
    assert sum(looked.values()) == len(lines)  # once each, not once per partition
    assert source._shared.windows == {}


def test_partitions_resumed_at_other_offsets_read_privately(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    _log(path)
    source = ShardedReplaySource(path, SHARDS, ShardOf(SHARDS), batch_size=16)
    names = source.list_parts()
    whole = [list(b) for b in _round_robin([source.build_part("in", n, None) for n in names])]
    first = ShardedReplaySource(path, SHARDS, ShardOf(SHARDS), batch_size=16)
    parts = [first.build_part("in", n, None) for n in names]
    head = parts[1].next_batch() + parts[0].next_batch() + parts[0].next_batch()
    states = [p.snapshot() for p in parts]
    assert len(set(states)) == 3  # partition 0 two windows in, 1 one, the others none
    again = ShardedReplaySource(path, SHARDS, ShardOf(SHARDS), batch_size=16)
    tail = _round_robin([again.build_part("in", n, s) for n, s in zip(names, states, strict=True)])
    assert sorted(map(list, head + tail)) == sorted(whole)


def test_a_window_without_dead_letters_gives_each_part_its_largest_ts() -> None:
    """``parse_window`` takes each part's largest event ``ts`` while routing (the parse
    metrics' ``max_ts``): the ``max`` of its events' (item copies included), with event
    times out of order, a user's events in runs and item events later and earlier than
    the users' events; a window with a dead letter leaves it to the metrics (None)."""
    import random

    rng = random.Random(3)
    lines = []
    for i in range(400):
        ts = T0 + rng.randrange(50_000)
        if i % 9 == 0:
            lines.append(orjson.dumps({"type": "item", "ts": ts + rng.choice((-60_000, 60_000)),
                                       "item_id": f"i{i}", "attrs": {}}))
        else:
            user = f"u{(i // 3) % 23}"  # runs of three events of one user
            lines.append(orjson.dumps({"type": "impression", "ts": ts, "impression_id": f"m{i}",
                                       "user_id": user, "item_id": "i1", "request_id": "r",
                                       "position": 0, "context": {}}))
    shard_of = ShardOf(SHARDS)
    taken = 0
    for size in (5, 37, 400):
        parser = EventParser()
        for i in range(0, len(lines), size):
            for part in parse_window(lines[i:i + size], parser, range(SHARDS), shard_of).values():
                assert part.max_ts == max((e.ts for e in part.events), default=None)
                taken += part.max_ts is not None
    assert taken > 100
    parser = EventParser()
    parts = parse_window([*lines[:20], b"{oops"], parser, range(SHARDS), shard_of)
    assert [part.max_ts for part in parts.values()] == [None] * SHARDS
