"""PointInTime: the user's own history with an item is a feature (``ui.*``), the same in
the per-item dicts and in the columns the vectorised scorer reads."""

from __future__ import annotations

from operators.point_in_time import PointInTime
from state.user_history import UserHistory

T0 = 1_767_225_600_000


def test_user_item_history_features() -> None:
    history, liked = UserHistory(), UserHistory()
    history.add("u1", "seen", T0 - 2_000)
    history.add("u1", "loved", T0 - 1_000)
    liked.add("u1", "loved", T0 - 1_000)
    context = PointInTime(history=history, liked=liked)
    ctx = context.user("u1", T0)
    items = ["seen", "loved", "new"]
    feats = context.item_features(ctx, items, T0)
    assert [(f.get("ui.interacted", 0.0), f.get("ui.liked", 0.0)) for f in feats] == [
        (1.0, 0.0), (1.0, 1.0), (0.0, 0.0)]
    cols = context.item_columns(ctx, items, T0)
    assert cols.numeric["ui.interacted"].tolist() == [1.0, 1.0, 0.0]
    assert cols.numeric["ui.liked"].tolist() == [0.0, 1.0, 0.0]
    # A user with no history with any of the items: no column at all (absent = 0).
    other = context.user("u2", T0)
    assert "ui.interacted" not in context.item_columns(other, items, T0).numeric
    assert all("ui.interacted" not in f for f in context.item_features(other, items, T0))
