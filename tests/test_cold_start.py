"""Cold start: every request gets k items as soon as any item is known, before any
snapshot exists (catalog from item events, the shard's own popularity, exploration)."""

from __future__ import annotations

from flows.inprocess import InProcessFlow
from operators.cold_start import backfill
from state.popularity import PopularityCounter

T0 = 1_767_225_600_000


def _item(n: int, ts: int = T0, available: bool = True) -> dict:
    return {"type": "item", "ts": ts, "item_id": f"i{n}", "attrs": {"category": f"c{n % 3}"},
            "available": available}


def _request(rid: str, user: str, ts: int, k: int = 10, exclude: list[str] | None = None) -> dict:
    return {"type": "request", "ts": ts, "request_id": rid, "user_id": user, "k": k,
            "exclude": exclude or []}


def test_requests_get_k_items_before_any_snapshot() -> None:
    flow = InProcessFlow({"shards": {"users": 2, "items": 2}})
    try:
        [first] = flow.feed([_request("r0", "u1", T0 - 1)])
        assert first["items"] == []  # nothing known yet: the one allowed empty answer
        catalog = [_item(n) for n in range(15)] + [_item(3, T0 + 1, available=False)]
        clicks = [{"type": "feedback", "ts": T0 + 10 + n, "user_id": "u9", "item_id": "i7",
                   "action": "click"} for n in range(3)]
        recs = flow.feed(catalog + clicks + [
            _request("r1", "u1", T0 + 100), _request("r2", "u2", T0 + 100, k=12, exclude=["i0"]),
            _request("r3", "u1", T0 + 101, k=20)])
        # Answered before any item table or index was loaded (published after the batch).
        assert all(not shard.server.views.loaded_tables() for shard in flow.users.values())
        assert all(r["index_version"] is None and r["model_version"] is None for r in recs)
        by_id = {r["request_id"]: [i["item_id"] for i in r["items"]] for r in recs}
        assert len(by_id["r1"]) == 10 and len(by_id["r2"]) == 12
        assert len(by_id["r3"]) == 14  # every available item once: 15 known, i3 retired
        for items in by_id.values():
            assert "i3" not in items and len(set(items)) == len(items)
        assert "i0" not in by_id["r2"]
        counters = flow.counters()
        assert counters["empty_answers"] == 1 and counters["backfilled"] == 10 + 12 + 14
    finally:
        flow.close()


def test_backfill_order_popular_then_catalog_and_filters() -> None:
    pop = PopularityCounter()
    for n, item in enumerate(["b", "b", "c", "x"]):
        pop.add(item, T0 + n)
    catalog = {i: {"available": i != "d"} for i in "abcdefg"}
    record = {"request_id": "r", "items": [{"item_id": "a", "score": 1.0, "source": "covis"}]}
    added = backfill(record, 5, catalog, pop, blocked={"c"}, excluded={"e"})
    items = [i["item_id"] for i in record["items"]]
    # Popular first ("x" is popular but not in the catalog), then the catalog's rest.
    assert added == 3 and items[:2] == ["a", "b"] and set(items[2:]) == {"f", "g"}
    assert not {"c", "d", "e", "x"} & set(items)


def test_backfilled_catalog_items_come_in_the_requests_hash_order() -> None:
    """The catalog's rest in the order of ``stable_hash64(f"{request_id}|{item}")`` (us15:
    hashed in one pass, the best ``k`` taken without sorting all), per request."""
    from state.hashing import stable_hash64

    catalog = {f"i{n}": {} for n in range(300)}
    for rid in ("r1", "r2", None):
        for k in (1, 7, 400):
            record = {"request_id": rid, "items": []}
            added = backfill(record, k, catalog, PopularityCounter(), (), ())
            want = sorted(catalog, key=lambda i: stable_hash64(f"{rid}|{i}"))[:k]
            assert [i["item_id"] for i in record["items"]] == want and added == len(want)
