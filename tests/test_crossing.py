"""operators/crossing.py: stage inputs that may cross processes are pickled once."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from bytewax.operators import StatefulLogic

from operators.crossing import PickledOnce, Unwrapped, UnwrappedPartition, unwrap


class _Counted:
    """Counts how often it is pickled (class attribute ``reduced``)."""

    reduced = 0

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        type(self).reduced += 1
        return _Counted, (self.payload,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Counted) and other.payload == self.payload


def test_a_value_pickled_twice_is_serialized_once_and_unpickles_as_itself() -> None:
    """Bytewax pickles a crossing item twice (size, then write): the second dumps reuses
    the first's bytes, and the other process gets the value, not a wrapper."""
    _Counted.reduced = 0
    value = ("i001", [_Counted({"item": "m1", "n": 3})], 7)
    once = PickledOnce(value)
    first, second = pickle.dumps(once), pickle.dumps(once)
    assert first == second and _Counted.reduced == 1
    assert pickle.loads(first) == value and _Counted.reduced == 1
    assert pickle.loads(pickle.dumps(PickledOnce(value))) == value and _Counted.reduced == 2


def test_a_counting_wrapper_of_pickle_installed_later_sees_each_crossing_item_once(
        monkeypatch) -> None:
    """bench/scaleout.py wraps ``pickle.loads`` and ``dumps`` after the flow's imports to
    count what crosses: a ``PickledOnce`` still pickles (its reconstructor is importable
    by name) and is counted once, not once more for its inner pickle."""
    calls = {"dumps": 0, "loads": 0}
    dumps, loads = pickle.dumps, pickle.loads

    def counted_dumps(*args: Any, **kwargs: Any) -> bytes:
        calls["dumps"] += 1
        return dumps(*args, **kwargs)

    def counted_loads(*args: Any, **kwargs: Any) -> Any:
        calls["loads"] += 1
        return loads(*args, **kwargs)

    monkeypatch.setattr(pickle, "dumps", counted_dumps)
    monkeypatch.setattr(pickle, "loads", counted_loads)
    assert pickle.loads(pickle.dumps(PickledOnce({"a": [1, 2]}))) == {"a": [1, 2]}
    assert calls == {"dumps": 1, "loads": 1}


def test_arrays_and_records_survive_the_round_trip_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    value = [{"x": rng.standard_normal((4, 5)).astype(np.float32), "label": 1, "w": 0.1 + 0.2}]
    back = pickle.loads(pickle.dumps(PickledOnce(value)))
    assert back[0]["x"].dtype == np.float32 and back[0]["x"].tobytes() == value[0]["x"].tobytes()
    assert back[0]["w"] == value[0]["w"] and back[0]["label"] == 1


def test_unwrap_gives_the_value_of_a_wrapper_that_stayed_and_leaves_others() -> None:
    value = [1, 2]
    assert unwrap(PickledOnce(value)) is value
    assert unwrap(value) is value


class _Recording(StatefulLogic[Any, Any, list[Any]]):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_item(self, value: Any) -> tuple[list[Any], bool]:
        self.seen.append(value)
        return [len(self.seen)], StatefulLogic.RETAIN

    def on_eof(self) -> tuple[list[Any], bool]:
        return ["eof"], StatefulLogic.DISCARD

    def snapshot(self) -> list[Any]:
        return self.seen


def test_an_unwrapped_stage_sees_the_values_whether_they_stayed_or_crossed() -> None:
    inner = _Recording()
    logic = Unwrapped(inner)
    stayed = ["a"]
    crossed = pickle.loads(pickle.dumps(PickledOnce(["b"])))
    assert logic.on_item(PickledOnce(stayed)) == ([1], False)
    assert logic.on_item(crossed) == ([2], False)
    assert inner.seen[0] is stayed and inner.seen[1] == ["b"]
    assert logic.on_eof() == (["eof"], True)
    assert logic.snapshot() is inner.seen and logic.notify_at() is None


def test_named_sinks_write_wrapped_batches_as_the_batches_themselves(tmp_path: Path) -> None:
    """The file records and answers go to ``NamedSinks`` as ``PickledOnce`` batches: one
    that stayed in its process (the wrapper) and one that crossed (unpickled) are written
    byte for byte as the bare batches; the partition's snapshot and close are the file's."""
    from operators.sinks import JsonlFileSink, NamedSinks

    batches = [[{"i": i, "x": [i * 0.5], "s": "é"} for i in range(n)] for n in (3, 0, 70)]
    bare = JsonlFileSink(tmp_path / "bare", "examples").build_part("out", "examples.jsonl", None)
    bare.write_batch(batches)
    bare.close()
    part = NamedSinks({"examples": JsonlFileSink(tmp_path, "examples")}).build_part(
        "out", "examples", None)
    assert isinstance(part, UnwrappedPartition)
    stayed = [PickledOnce(b) for b in batches[:2]]
    crossed = [pickle.loads(pickle.dumps(PickledOnce(batches[2])))]
    part.write_batch(stayed)
    part.write_batch(crossed)
    assert part.snapshot() == (tmp_path / "examples.jsonl").stat().st_size
    part.close()
    assert (tmp_path / "examples.jsonl").read_bytes() == (
        tmp_path / "bare" / "examples.jsonl").read_bytes()
