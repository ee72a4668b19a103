"""The static item features shared by a process's user shards (``_SHARED_STATICS``): a
shard whose catalog holds an equal copy of an item's attributes reuses another shard's,
and gets exactly what it would have computed itself."""

from __future__ import annotations

import math
from typing import Any

import pytest

from models.features import compact
from operators import point_in_time
from operators.example_codec import encoded_part
from operators.point_in_time import PointInTime, static_item_features
from state.join_state import float32_features


def _typed(value: Any) -> Any:
    """``value`` with the type (and sign of zero) of every number in it, for comparisons
    that ``1 == 1.0 == True`` and ``0.0 == -0.0`` would pass."""
    if isinstance(value, dict):
        return [(k, _typed(v)) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [_typed(v) for v in value]
    if type(value) is float:
        return (float, value, math.copysign(1.0, value))
    return (type(value), value)


def _computed(item: str, attrs: dict[str, Any]) -> tuple[Any, Any, Any]:
    static = static_item_features(item, None, attrs)
    rounded = float32_features(compact(static))
    return static, rounded, encoded_part(rounded)


@pytest.fixture(autouse=True)
def _fresh_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(point_in_time, "_SHARED_STATICS", {})
    monkeypatch.setattr(point_in_time, "_SHARED_BY_ATTRS", {})


def test_a_shard_reuses_another_shards_static_features_of_equal_attributes() -> None:
    first, second = PointInTime(), PointInTime()
    attrs = {"category": "c3", "price": 12.345678912, "available": True}
    one = first._static_part("i1", None, attrs)
    two = second._static_part("i1", None, dict(attrs))  # its own copy, as each shard has
    assert all(a is b for a, b in zip(one, two, strict=True))  # shared, not computed again
    assert _typed(two) == _typed(_computed("i1", attrs))


@pytest.mark.parametrize(("a", "b"), [
    ({"price": 1}, {"price": 1.0}),          # equal, of another type
    ({"flag": True}, {"flag": 1}),
    ({"price": 0.0}, {"price": -0.0}),       # equal zeros of another sign
    ({"tags": ["x"]}, {"tags": ["x"]}),      # a list: not shared
])
def test_attributes_equal_in_value_only_give_each_shard_its_own(a: dict[str, Any],
                                                                 b: dict[str, Any]) -> None:
    first, second = PointInTime(), PointInTime()
    first._static_part("i1", None, a)
    got = second._static_part("i1", None, b)
    assert _typed(got) == _typed(_computed("i1", b))


def test_another_item_with_equal_attributes_is_its_own() -> None:
    first, second = PointInTime(), PointInTime()
    attrs = {"category": "c3", "price": 2.5}
    first._static_part("i1", None, attrs)
    assert _typed(second._static_part("i2", None, dict(attrs))) == _typed(_computed("i2", attrs))


def test_shards_share_an_item_events_catalog_entry_and_its_static_features(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The user shards of a process take one ``item`` event object: they hold one catalog
    entry for it (``catalog_attrs``), and a shard's first read of it takes another
    shard's static features by the entry's identity (no ``_attrs_key``), exactly what it
    would compute; the same object read for another item is that item's own."""
    from events.model import Item
    from operators.user_shard import UserShard
    from state.join_state import JoinConfig
    from state.sampling import NegativeSampler

    event = Item(1_767_225_600_000, "i1", {"category": "c3", "price": 12.345678912}, False)
    shards = [UserShard(JoinConfig(), NegativeSampler()) for _ in range(2)]
    for shard in shards:
        shard.process("u000", [event])
    entry = shards[0].catalog["i1"]
    assert shards[1].catalog["i1"] is entry and entry == {**event.attrs, "available": False}
    one = shards[0].context._static_part("i1", None, entry)

    def no_key(attrs: dict[str, Any]) -> None:
        raise AssertionError("an identity hit builds no key")

    attrs_key = point_in_time._attrs_key
    monkeypatch.setattr(point_in_time, "_attrs_key", no_key)
    two = shards[1].context._static_part("i1", None, entry)
    assert all(a is b for a, b in zip(one, two, strict=True))
    assert _typed(two) == _typed(_computed("i1", entry))
    monkeypatch.setattr(point_in_time, "_attrs_key", attrs_key)
    other = PointInTime()._static_part("i2", None, entry)
    assert _typed(other) == _typed(_computed("i2", entry))
