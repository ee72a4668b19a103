"""Retrieval work kept across requests and exact (issue 18 point 2, serve9): the ANN
source's answer per user (``Server._ann_rows``). Every memo is checked against the
answer computed from scratch after each thing that invalidates it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from serving_world import DIM, World, warm_up

from operators.point_in_time import UserContext
from operators.serving import Server


def _ctx(user: str, vector: np.ndarray) -> UserContext:
    return UserContext(user, [], {}, vector, {})


def _counting(server: Server) -> list[int]:
    """Count the index's ``query_arrays`` calls of ``server`` (the reader's method)."""
    calls = [0]
    reader = server.views.index
    query = reader.query_arrays

    def counted(vec: np.ndarray, k: int) -> Any:
        calls[0] += 1
        return query(vec, k)

    reader.query_arrays = counted  # type: ignore[method-assign]
    return calls


def _fresh(server: Server, vector: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer from scratch: the current index's ``query_arrays``, named as rows."""
    items, scores = server.views.index.index.query_arrays(vector, n)
    return server._space().rows(items), scores


def _same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].dtype == np.int64 and got[1].dtype == np.float64
    assert got[0].tolist() == want[0].tolist()
    assert got[1].tobytes() == want[1].tobytes()


def test_ann_answers_are_kept_per_user_vector_and_index_version(tmp_path: Path) -> None:
    """A user asking again with the same vector on the same index version gets the kept
    answer (no search); another vector, another ``n``, a new index version or a new id
    space searches again, and every answer equals the search from scratch."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard()
    warm_up(shard)
    server = shard.server
    assert server is not None and server.views.index.refresh()
    calls = _counting(server)
    rng = np.random.default_rng(11)
    v1, v2 = (rng.normal(size=DIM).astype(np.float32) for _ in range(2))

    first = server._ann_rows(_ctx("u1", v1), 12, server._space())
    _same(first, _fresh(server, v1, 12))
    again = server._ann_rows(_ctx("u1", v1.copy()), 12, server._space())
    assert calls[0] == 1
    _same(again, first)
    _same(server._ann_rows(_ctx("u1", v2), 12, server._space()), _fresh(server, v2, 12))
    _same(server._ann_rows(_ctx("u1", v2), 7, server._space()), _fresh(server, v2, 7))
    _same(server._ann_rows(_ctx("u2", v2), 7, server._space()), _fresh(server, v2, 7))
    assert calls[0] == 4
    _same(server._ann_rows(_ctx("u1", v1), 12, server._space()), first)
    assert calls[0] == 5

    # a new index version whose vectors changed: the kept answer is stale
    for item in world.vectors:
        world.vectors[item] = rng.normal(size=DIM).astype(np.float32)
    world.publish_index()
    assert server.views.index.refresh()
    stale = server._ann_rows(_ctx("u1", v1), 12, server._space())
    assert calls[0] == 6
    _same(stale, _fresh(server, v1, 12))
    assert stale[0].tolist() != first[0].tolist() or stale[1].tolist() != first[1].tolist()

    # a new id space (the view's ids churned past its bound): rows of the new space
    server.min_view_ids = 0
    server.covis_view.names.extend(f"churned{j}" for j in range(10**4))
    server._bound_ids()
    assert server.view_resets == 1
    renamed = server._ann_rows(_ctx("u1", v1), 12, server._space())
    assert calls[0] == 7
    _same(renamed, _fresh(server, v1, 12))


def test_ann_memo_keeps_at_most_its_bound_of_users(tmp_path: Path) -> None:
    """The memo holds the last ``ann_memo_users`` users (the memory bound's
    ``ann_memo_user`` entries), the oldest dropped first."""
    world = World(tmp_path)
    world.publish_all()
    shard = world.user_shard()
    warm_up(shard)
    server = shard.server
    assert server is not None and server.views.index.refresh()
    server.ann_memo_users = 3
    calls = _counting(server)
    vec = np.ones(DIM, np.float32)
    for user in ("a", "b", "c", "d"):
        server._ann_rows(_ctx(user, vec), 5, server._space())
    assert len(server._ann_memo[2]) == 3 and calls[0] == 4
    server._ann_rows(_ctx("d", vec), 5, server._space())
    server._ann_rows(_ctx("b", vec), 5, server._space())
    assert calls[0] == 4
    server._ann_rows(_ctx("a", vec), 5, server._space())  # dropped first
    assert calls[0] == 5 and len(server._ann_memo[2]) == 3
