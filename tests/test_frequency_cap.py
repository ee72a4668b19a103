"""Frequency capping of unclicked repeats (state/frequency_cap.py): counts, the cap, the
cool-down, the bounds, snapshots and config validation. Serving's use of it:
tests/test_serving_filter.py::test_frequency_cap_keeps_unclicked_repeats_out."""

from __future__ import annotations

import pickle

import pytest

from flows.config import ConfigError, load_config
from state.frequency_cap import ENGAGED, FrequencyCap, FrequencyCapConfig


def shown(cap: FrequencyCap, user: str, item: str, times: int, ts: int = 0) -> None:
    for n in range(times):
        cap.shown(user, item, ts + n)


def test_an_item_is_capped_after_n_unclicked_showings() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=3))
    shown(cap, "u", "a", 2)
    shown(cap, "u", "b", 3)
    shown(cap, "v", "a", 5)
    assert cap.blocked("u", 10) == {"b"}
    assert cap.blocked("v", 10) == {"a"}
    cap.shown("u", "a", 10)
    assert cap.blocked("u", 11) == {"a", "b"}
    assert cap.blocked("nobody", 11) == set()


def test_items_the_user_interacted_with_are_never_capped() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=2))
    shown(cap, "u", "clicked", 5)
    cap.engaged("u", "clicked")  # a click after five showings lifts the cap
    cap.engaged("u", "viewed")  # an organic view before any showing
    shown(cap, "u", "viewed", 5, ts=10)
    shown(cap, "u", "clicked", 5, ts=20)
    shown(cap, "u", "ignored", 2, ts=30)
    assert cap.blocked("u", 40) == {"ignored"}
    assert cap.users["u"]["clicked"] == (ENGAGED, 24)


def test_a_cooldown_lets_a_capped_item_come_back_once_per_cooldown() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=2, cooldown_ms=1_000))
    shown(cap, "u", "a", 2, ts=0)  # last shown at 1 ms
    assert cap.blocked("u", 1_000) == {"a"}
    assert cap.blocked("u", 1_001) == set()
    cap.shown("u", "a", 1_001)
    assert cap.blocked("u", 2_000) == {"a"}


def test_off_caps_nothing() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=0))
    shown(cap, "u", "a", 50)
    assert cap.blocked("u", 100) == set()


def test_counts_stay_within_their_bounds() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=1, max_items=3, max_users=2))
    for n, item in enumerate("abcd"):
        cap.shown("u", item, n)
    assert list(cap.users["u"]) == ["b", "c", "d"]  # "a" least recently shown: forgotten
    cap.shown("u", "b", 10)
    assert list(cap.users["u"]) == ["c", "d", "b"]
    cap.shown("v", "a", 11)
    cap.shown("w", "a", 12)  # "u" least recently shown: forgotten
    assert list(cap.users) == ["v", "w"]
    assert cap.blocked("u", 13) == set()


def test_state_restored_equal_after_a_snapshot() -> None:
    cap = FrequencyCap(FrequencyCapConfig(shows=2, cooldown_ms=500))
    shown(cap, "u", "a", 3)
    shown(cap, "v", "b", 1)
    cap.engaged("v", "b")
    back = pickle.loads(pickle.dumps(cap))
    assert back == cap
    assert back.blocked("u", 100) == cap.blocked("u", 100) == {"a"}
    back.shown("v", "c", 200)
    assert back != cap


@pytest.mark.parametrize("key, value", [("shows", -1), ("cooldown_ms", -5),
                                        ("max_items", 0), ("max_users", 0)])
def test_config_values_are_validated(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"serving.frequency_cap.{key}"):
        load_config({"serving": {"frequency_cap": {key: value}}})
