"""The user history (state/user_history.py): recency order and bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from state.bounded import memo_put
from state.user_history import UserHistory


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=600), st.integers(0, 120))
def test_recent_is_the_newest_distinct_items_newest_first(items: list[int], n: int) -> None:
    """``recent(n)`` reads the newest ``n`` keys (short and long histories alike): the
    distinct items by their last interaction, newest first."""
    history = UserHistory(max_items_per_user=250)
    for ts, item in enumerate(items):
        history.add("u", str(item), ts)
    last: dict[str, int] = {}
    for ts, item in enumerate(items):
        last[str(item)] = ts
    want = sorted(last, key=last.__getitem__, reverse=True)[:min(n, 250)]
    assert history.recent("u", n) == want
    assert history.recent("nobody", n) == []


def test_memo_put_empties_the_memo_when_full() -> None:
    memo: dict[str, int] = {}
    for n in range(3):
        assert memo_put(memo, f"k{n}", n, 3) == n
    assert memo == {"k0": 0, "k1": 1, "k2": 2}
    memo_put(memo, "k3", 3, 3)
    assert memo == {"k3": 3}
