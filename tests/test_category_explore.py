"""Thompson sampling across categories (models/category_bandit.py, operators/category_explore.py).

The model is driven directly (posteriors, ordering, propensities, forgetting); the
serving path through a real ``UserShard`` (tests/serving_world.py): impressions and
clicks reach the posteriors, the lists follow them, the propensities are logged.
"""

from __future__ import annotations

import numpy as np
import pytest
from serving_world import CATEGORY, ITEMS, T0, World, ask, feed, warm_up

from events.model import Feedback, Impression, Item, Request
from flows.config import ConfigError, load_config
from models.category_bandit import (
    CATEGORY_MODES,
    CategoryBandit,
    CategoryExploreConfig,
    CodedCategories,
    best_by_row,
    category_codes,
)
from operators.candidates import SOURCES, CandidatePool
from operators.category_explore import CategoryExplore

CATS = ["c0", "c1", "c2", "c3"]


def show(bandit: CategoryBandit, user: str, lists: int, clicked: str | None,
         start: int = 0) -> None:
    """``lists`` lists of 8 impressions (2 per category); one click on ``clicked`` each."""
    for n in range(start, start + lists):
        for pos in range(8):
            bandit.exposure(user, CATS[pos % 4], pos, f"{user}:{n}")
        if clicked is not None:
            bandit.click(user, clicked)


def alike_shard(bandit: CategoryBandit, lists: int = 200, clicks: int = 30) -> CategoryBandit:
    """The shard's rates all alike: ``lists`` lists shown to "others", ``clicks`` clicks
    on every category."""
    show(bandit, "others", lists, None)
    for cat in CATS:
        for _ in range(clicks):
            bandit.click("others", cat)
    return bandit


def pool(n_per_cat: int = 10) -> tuple[np.ndarray, list[str | None]]:
    """Scores that favour c0 (then c1, c2, c3) at every rank."""
    cats = [CATS[i % 4] for i in range(4 * n_per_cat)]
    scores = np.array([1.0 - 0.01 * i for i in range(4 * n_per_cat)])
    return scores, cats


def share(bandit: CategoryBandit, user: str, category: str, requests: int = 200) -> float:
    scores, cats = pool()
    hits = 0
    for seed in range(requests):
        out = bandit.order(user, scores, cats, 10, seed)
        assert out is not None
        hits += sum(cats[i] == category for i in out[0].tolist())
    return hits / (10 * requests)


def bound_added(entries: int, kind: str, on: dict[str, float], off: dict[str, float]) -> None:
    """The memory bound's user shards grow by ``entries`` x ``BYTES[kind]`` per shard
    between the ``serving.category_explore`` settings ``off`` and ``on``."""
    from flows.memory import ALLOCATOR_OVERHEAD, BYTES, memory_bound

    def user_shards(explore: dict[str, float]) -> float:
        config = load_config({"serving": {"category_explore": explore}})
        return memory_bound(config)["parts_mb"]["user_shards"]

    shards = load_config({}).shards.users
    assert user_shards(on) - user_shards(off) == pytest.approx(
        shards * entries * BYTES[kind] * ALLOCATOR_OVERHEAD / 2**20)


def test_a_user_whose_clicks_favour_a_category_gets_more_of_it() -> None:
    bandit = CategoryBandit(CategoryExploreConfig())
    alike_shard(bandit)
    show(bandit, "fan", 6, "c3")
    show(bandit, "c0 fan", 6, "c0")
    # The scorer puts c3 last; the fan's clicks lift it well above a quarter of the slots.
    assert share(bandit, "fan", "c3") > 0.5
    assert share(bandit, "fan", "c3") > share(bandit, "c0 fan", "c3") + 0.25


def test_inside_a_category_the_scorer_order_holds() -> None:
    bandit = CategoryBandit(CategoryExploreConfig())
    show(bandit, "u", 2, "c1")
    scores, cats = pool()
    idx, _ = bandit.order("u", scores, cats, 10, 3)
    for cat in CATS:
        ranks = [i for i in idx.tolist() if cats[i] == cat]
        assert ranks == sorted(ranks)  # best score first within each category


def test_sampling_is_deterministic_per_request_seed() -> None:
    bandit = CategoryBandit(CategoryExploreConfig())
    show(bandit, "u", 3, "c2")
    scores, cats = pool()
    first = bandit.order("u", scores, cats, 10, 42)
    again = bandit.order("u", scores, cats, 10, 42)
    assert first is not None and again is not None
    assert first[0].tolist() == again[0].tolist()
    assert first[1].tolist() == again[1].tolist()
    lists = {tuple(bandit.order("u", scores, cats, 10, s)[0].tolist()) for s in range(20)}
    assert len(lists) > 1  # other request ids draw other lists


def test_a_drifted_users_posterior_moves_to_the_new_taste() -> None:
    forgets = CategoryBandit(CategoryExploreConfig(decay=0.8))
    remembers = CategoryBandit(CategoryExploreConfig(decay=1.0))
    for bandit in (forgets, remembers):
        show(bandit, "u", 12, "c0")
        show(bandit, "u", 4, "c2", start=12)
    for bandit, moved in ((forgets, True), (remembers, False)):
        a, b = bandit.posterior("u", CATS)
        mean = a / (a + b)
        assert bool(mean[2] > mean[0]) is moved


def test_users_without_impressions_keep_the_scorer_order() -> None:
    """A rating log (no impressions, feedback without impression) never re-orders."""
    bandit = CategoryBandit(CategoryExploreConfig())
    scores, cats = pool()
    assert bandit.order("u", scores, cats, 10, 0) is None
    bandit.click("u", "c1")  # a click without a logged exposure is no evidence of exposure
    assert bandit.order("u", scores, cats, 10, 0) is None


def test_logged_propensity_estimates_how_often_the_slot_is_drawn() -> None:
    bandit = CategoryBandit(CategoryExploreConfig(propensity_draws=400))
    show(bandit, "u", 3, "c1")
    scores, cats = pool()
    firsts: dict[str, int] = {}
    logged: dict[str, list[float]] = {}
    n = 1000
    for seed in range(n):
        idx, props = bandit.order("u", scores, cats, 10, seed)
        cat = cats[int(idx[0])]
        firsts[cat] = firsts.get(cat, 0) + 1
        logged.setdefault(cat, []).append(float(props[0]))
        assert np.all((props > 0) & (props <= 1))
    for cat, count in firsts.items():
        assert abs(np.mean(logged[cat]) - count / n) < 0.06


def test_config_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="serving.category_explore.decay"):
        load_config({"serving": {"category_explore": {"decay": 0.0}}})
    with pytest.raises(ConfigError, match="serving.category_explore.prior_strength"):
        load_config({"serving": {"category_explore": {"prior_strength": -1}}})
    for key, value in (("history_prior", -1.0), ("item_lift", -1.0), ("sharpen", 0.0),
                       ("item_rate", ["item.clicks.1d"]), ("change_threshold", -1.0),
                       ("change_fade", 1.5), ("group_prior", -1.0), ("max_groups", 0),
                       ("explore_slots", -1), ("half_life_s", -1.0)):
        with pytest.raises(ConfigError, match=f"serving.category_explore.{key}"):
            load_config({"serving": {"category_explore": {key: value}}})


def test_the_user_shard_serves_the_category_its_user_clicks(world: World) -> None:
    """Through the shard: impressions and clicks reach the posteriors; the lists of a user
    who clicks c3 hold more c3 than those of a user shown the same lists who clicks c0,
    and the items carry the logged propensities."""
    world.publish_all()
    shard = world.user_shard(category_explore=CategoryExploreConfig(enabled=True))
    twin = world.user_shard(category_explore=CategoryExploreConfig(enabled=True))
    plain = world.user_shard(category_explore=CategoryExploreConfig(enabled=False))
    for s in (shard, twin, plain):
        feed(s, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]}) for item in ITEMS])
        warm_up(s)
    by_cat = {c: [i for i in ITEMS if CATEGORY[i] == c] for c in CATS}
    shown = by_cat["c0"][:4] + by_cat["c1"][:1] + by_cat["c2"][:1] + by_cat["c3"][:4]
    events = []
    for user, first in (("fan", 6), ("c0 fan", 0)):  # c0 items at 0-3, c3 at 6-9
        for rep in range(4):
            ts = T0 - 600_000 + rep * 1000
            for pos, item in enumerate(shown):
                events.append(Impression(ts, f"i:{user}:{rep}:{pos}", user, item,
                                         f"r:{user}:{rep}", pos))
            pos = first + rep
            events.append(Feedback(ts + 10, user, shown[pos], "click", f"i:{user}:{rep}:{pos}"))
    events.sort(key=lambda e: e.ts)
    for s in (shard, twin, plain):
        feed(s, events)
    # Deterministic per request id: a replay (a second shard fed the same events) serves the
    # same items with the same propensities.
    first = ask(shard, "fan", ts=T0 + 50, request_id="q:replay")
    assert first["items"] == ask(twin, "fan", ts=T0 + 50, request_id="q:replay")["items"]

    def c3(s, user: str) -> int:
        return sum(sum(CATEGORY.get(i["item_id"]) == "c3" for i in
                       ask(s, user, ts=T0 + n, request_id=f"q:{user}:{n}")["items"])
                   for n in range(20))

    assert c3(shard, "fan") > c3(shard, "c0 fan") + 20
    # The control: without sampling the scorer gives the fan fewer c3 items than the c0 fan.
    assert c3(plain, "fan") <= c3(plain, "c0 fan")
    assert c3(shard, "fan") > c3(plain, "fan") + 20
    record = ask(shard, "fan", ts=T0 + 99, request_id="q:props")
    props = [i["propensity"] for i in record["items"]]
    assert all(0 < p <= 1 for p in props) and any(p < 1 for p in props)
    assert shard.counters()["served_by_category_sampling"] >= 22
    cold = ask(shard, "cold", ts=T0 + 100, request_id="q:cold")  # no impressions: unchanged
    assert [i["item_id"] for i in cold["items"]] == [
        i["item_id"] for i in ask(plain, "cold", ts=T0 + 100, request_id="q:cold")["items"]]


def test_organic_signals_reveal_the_category_before_any_click() -> None:
    """Views (declared organic signals) of c2 items lift c2 for a user who never clicked;
    with ``organic = false`` they are ignored."""
    counts = {}
    for organic in (True, False):
        explore = CategoryExplore(CategoryExploreConfig(organic=organic))
        show(explore.bandit, "u", 2, None)
        for n in range(4):
            explore.feedback("u", f"v{n}", "c2", "view", None, 0.3)
        explore.feedback("u", "r1", "c2", "rating", None, None)  # not a declared signal
        counts[organic] = share(explore.bandit, "u", "c2")
    assert counts[True] > counts[False] + 0.15


def test_item_adjusted_exposure_discounts_clicks_on_items_everyone_clicks() -> None:
    """With ``item_adjusted``, a category whose clicks went to an item every user clicks
    is credited less than one whose clicks went to an item nobody else clicks."""
    means = {}
    for adjusted in (True, False):
        bandit = CategoryBandit(CategoryExploreConfig(item_adjusted=adjusted))
        for n in range(40):  # the crowd clicks "hit" (c0), never "niche" (c1)
            bandit.exposure(f"o{n}", "c0", 0, f"o{n}", "hit")
            bandit.exposure(f"o{n}", "c1", 1, f"o{n}", "niche")
            bandit.click(f"o{n}", "c0", "hit")
        for rep in range(3):  # the user clicks both, once per list
            bandit.exposure("u", "c0", 0, f"u{rep}", "hit")
            bandit.exposure("u", "c1", 1, f"u{rep}", "niche")
            bandit.click("u", "c0", "hit")
            bandit.click("u", "c1", "niche")
        clicks_c0 = bandit.users["u"][1]["c0"]
        clicks_c1 = bandit.users["u"][1]["c1"]
        means[adjusted] = (clicks_c1[0] / clicks_c1[1]) / (clicks_c0[0] / clicks_c0[1])
    assert means[True] > 2 * means[False]  # the niche category's rate relative to the hit's


def test_posteriors_stay_within_max_users_and_the_memory_bound_counts_them() -> None:
    """The least recently updated users and items are dropped past ``max_users``, and the
    flow's memory bound (flows/memory.py) holds that many per user shard when enabled."""
    from flows.memory import ALLOCATOR_OVERHEAD, BYTES, memory_bound

    bandit = CategoryBandit(CategoryExploreConfig(max_users=3))
    for u in range(5):
        bandit.exposure(f"u{u}", "a", 0, f"r{u}", f"i{u}")
    assert list(bandit.users) == ["u2", "u3", "u4"]
    assert list(bandit.items) == ["i2", "i3", "i4"]

    no_lists = {"category": 0}  # the category source's lists: tests/test_category_items.py
    on = load_config({"serving": {"category_explore": {"max_users": 1_000}, "sources": no_lists}})
    off = load_config({"serving": {"category_explore": {"enabled": False}, "sources": no_lists}})
    added = memory_bound(on)["parts_mb"]["user_shards"] - memory_bound(off)["parts_mb"]["user_shards"]
    expected = on.shards.users * (1_000 * BYTES["category_user"] + on.join.max_pending
                                  * BYTES["category_lifts_impression"]  # ranker_feature
                                  ) * ALLOCATOR_OVERHEAD / 2**20
    assert added == pytest.approx(expected)
    # item_lift's click and impression columns of every loaded table (one per item shard)
    # and their copy side by side (state.item_rows.table_columns)
    flat = load_config({"serving": {"category_explore": {"max_users": 1_000, "item_lift": 0.0},
                                    "sources": no_lists}})
    added = (memory_bound(on)["parts_mb"]["serving_tables"]
             - memory_bound(flat)["parts_mb"]["serving_tables"])
    expected = (2 * on.shards.items * on.items.max_items * BYTES["table_rate_item"]
                * ALLOCATOR_OVERHEAD / 2**20)
    assert added == pytest.approx(expected) and BYTES["table_rate_item"] == 8 * len(
        on.serving.category_explore.item_rate)


def test_the_shard_keys_posteriors_by_the_catalogs_category_string(world: World) -> None:
    """A numeric ``category`` attribute is keyed as the catalog stores it ("7"), so the
    posteriors learned from impressions match the categories serving reads."""
    shard = world.user_shard(category_explore=CategoryExploreConfig(enabled=True))
    item = ITEMS[0]
    feed(shard, [Item(T0 - 3_600_000, item, {"category": 7}),
                 Impression(T0, "i:n:0", "numeric", item, "r:n:0", 0),
                 Feedback(T0 + 10, "numeric", item, "click", "i:n:0")])
    counts = shard.server.categories.bandit.users["numeric"][1]
    assert counts == {"7": [1.0, 1.0]}


def test_recent_positives_tilt_the_prior_toward_their_category() -> None:
    """``history_prior``: a user whose recent positives are c3 items gets more c3 before
    the bandit's own counts say so; off (0) or without positives the prior is the shard's."""
    shares = {}
    scores, cats = pool()
    n = len(scores)
    candidates = CandidatePool(np.arange(n), [f"x{i}" for i in range(n)],
                               np.zeros((len(SOURCES), n)), np.zeros((len(SOURCES), n), bool),
                               scores, cats)
    for beta in (0.0, 1.0):
        explore = CategoryExplore(CategoryExploreConfig(history_prior=beta))
        show(explore.bandit, "u", 2, None)
        hits = 0
        for r in range(100):
            request = Request(T0, f"q{r}", "u", 10)
            out = explore.order(request, "u", candidates, ["a", "b", "c"], 0.8,
                                {"a": "c3", "b": "c3", "c": "c0"}.get)
            assert out is not None
            hits += sum(c.category == "c3" for c in out)
        shares[beta] = hits / 1000
    assert shares[1.0] > shares[0.0] + 0.15
    bandit = CategoryBandit(CategoryExploreConfig(history_prior=1.0))
    assert bandit.tilt(CATS, {"c3": 1.0, "c0": 0.5}).tolist() == pytest.approx(
        [4 * 0.75 / 2.5, 4 * 0.25 / 2.5, 4 * 0.25 / 2.5, 4 * 1.25 / 2.5])
    assert bandit.tilt(CATS, None).tolist() == [1.0] * 4


def test_item_lift_puts_the_better_items_of_a_category_first() -> None:
    """``item_lift``: inside a category the items are weighed by their click rate over the
    category's (the whole stream's counts), so a well-clicked item the scorer ranks low
    climbs; off, the scorer's order holds inside the category."""
    scores, cats = pool()
    clicks = np.zeros(len(scores))
    shown = np.full(len(scores), 100.0)
    clicks[:] = 2.0
    best = max(i for i, c in enumerate(cats) if c == "c1")  # the scorer's last c1 item
    clicks[best] = 20.0
    ranks = {}
    for strength in (0.0, 20.0):
        bandit = CategoryBandit(CategoryExploreConfig(item_lift=strength))
        show(bandit, "u", 2, "c1")
        idx, _ = bandit.order("u", scores, cats, 40, 7, counts=(clicks, shown))
        c1 = [i for i in idx.tolist() if cats[i] == "c1"]
        ranks[strength] = c1.index(best)
    assert ranks[0.0] == 9  # the scorer's order: last of the ten c1 items
    assert ranks[20.0] < 3


def test_sharpen_explores_less_around_the_same_posterior() -> None:
    """``sharpen``: draws from Beta(x a, x b) keep the posterior's mean and shrink its
    spread, so the best category so far fills more slots and the logged propensities
    rise (the lists vary less)."""
    out = {}
    for x in (1.0, 8.0):
        bandit = CategoryBandit(CategoryExploreConfig(sharpen=x))
        alike_shard(bandit, 100, 15)
        show(bandit, "fan", 3, "c3")
        scores, cats = pool()
        props = [bandit.order("fan", scores, cats, 10, seed)[1].mean() for seed in range(50)]
        out[x] = (share(bandit, "fan", "c3"), float(np.mean(props)))
    assert out[8.0][0] > out[1.0][0] + 0.05
    assert out[8.0][1] > out[1.0][1] + 0.1


def test_posteriors_resume_equal_after_a_snapshot(world: World) -> None:
    """The shard's recovery state (pickled as Bytewax snapshots it) carries the posteriors
    and their least-recently-updated order: the resumed shard holds equal counts, serves the
    same list with the same propensities, and drops the same user past ``max_users``."""
    import pickle

    world.publish_all()
    config = CategoryExploreConfig(enabled=True, max_users=3)
    shard = world.user_shard(category_explore=config)
    feed(shard, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]}) for item in ITEMS])
    warm_up(shard)
    events: list = []
    for n, user in enumerate(("u1", "u2", "fan")):
        for pos, item in enumerate(ITEMS[:8]):
            events.append(Impression(T0 + n, f"i:{user}:{pos}", user, item, f"r:{user}", pos))
        events.append(Feedback(T0 + n + 1, user, ITEMS[3], "click", f"i:{user}:3"))
    feed(shard, events)
    bandit = shard.server.categories.bandit
    assert bandit.knows("fan") and bandit.users["fan"][1]  # the control: state to carry

    resumed = pickle.loads(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    again = resumed.server.categories.bandit
    assert list(again.users.items()) == list(bandit.users.items())
    assert list(again.items.items()) == list(bandit.items.items())
    assert (again.totals, again.all) == (bandit.totals, bandit.all)
    here = ask(shard, "fan", ts=T0 + 50, request_id="q:resume")
    there = ask(resumed, "fan", ts=T0 + 50, request_id="q:resume")
    assert [(i["item_id"], i["propensity"]) for i in here["items"]] == [
        (i["item_id"], i["propensity"]) for i in there["items"]]
    assert any(i["propensity"] < 1 for i in there["items"])  # ordered by sampling
    for s in (shard, resumed):
        feed(s, [Impression(T0 + 60, "i:new:0", "new", ITEMS[0], "r:new", 0)])
    assert list(resumed.server.categories.bandit.users) == list(bandit.users) == [
        "u2", "fan", "new"]


def test_item_lift_reads_the_counts_from_the_item_profiles() -> None:
    """The serving glue reads ``item_rate`` (clicks, impressions) of each candidate's
    item profile (``rates``); a candidate without a profile counts nothing (lift toward
    1)."""
    scores, cats = pool()
    n = len(scores)
    items = [f"x{i}" for i in range(n)]
    candidates = CandidatePool(np.arange(n), items, np.zeros((len(SOURCES), n)),
                               np.zeros((len(SOURCES), n), bool), scores, cats)
    best = max(i for i, c in enumerate(cats) if c == "c1")
    profiles = [{"item.clicks.1d": 20.0 if i == best else 2.0, "item.impressions.1d": 100.0}
                for i in range(n)]
    profiles[0] = None  # not published yet
    place = {}
    for strength in (0.0, 20.0):
        explore = CategoryExplore(CategoryExploreConfig(item_lift=strength))
        show(explore.bandit, "u", 2, "c1")
        out = explore.order(Request(T0, "q", "u", 40), "u", candidates,
                            rates=lambda p, names: np.array(
                                [[(f or {}).get(name, 0.0) for f in profiles] for name in names]
                                if p is candidates else []))
        assert out is not None
        place[strength] = [c.item_id for c in out if c.category == "c1"].index(items[best])
    assert place[0.0] == 9 and place[20.0] < 3


def test_users_like_this_one_set_a_new_users_prior() -> None:
    """``group_prior``: users of age group "a" click c3, those of "b" click c0; a newcomer
    of group "a" shown one list gets more c3 than a newcomer of "b" shown the same list;
    off (0), or without attributes, both start from the shard-wide rates alike."""
    out = {}
    for strength in (20.0, 0.0):
        bandit = CategoryBandit(CategoryExploreConfig(group_prior=strength))
        for n in range(40):
            group, liked = ("a", "c3") if n % 2 else ("b", "c0")
            attrs = {"age": group, "score": 3}  # a number is no group
            for pos in range(8):
                bandit.exposure(f"o{n}", CATS[pos % 4], pos, f"o{n}", attrs=attrs)
            bandit.click(f"o{n}", liked, attrs=attrs)
        for user, group in (("new a", "a"), ("new b", "b"), ("no attrs", None)):
            attrs = {"age": group} if group else None
            for pos in range(8):
                bandit.exposure(user, CATS[pos % 4], pos, f"{user}:0", attrs=attrs)
        shares = {}
        for user, group in (("new a", "a"), ("new b", "b"), ("no attrs", None)):
            attrs = {"age": group} if group else None
            scores, cats = pool()
            hits = 0
            for seed in range(200):
                idx, _ = bandit.order(user, scores, cats, 10, seed, attrs=attrs)
                hits += sum(cats[i] == "c3" for i in idx.tolist())
            shares[user] = hits / 2000
        out[strength] = shares
    assert out[20.0]["new a"] > out[20.0]["new b"] + 0.15
    assert out[20.0]["new a"] > out[20.0]["no attrs"] + 0.1
    assert out[0.0]["new a"] == out[0.0]["new b"] == out[0.0]["no attrs"]
    assert out[20.0]["no attrs"] == out[0.0]["no attrs"]


def test_a_moved_taste_fades_the_old_counts_and_a_held_one_keeps_them() -> None:
    """``change_threshold``: with no forgetting per list, a user who clicked c0 for 30 lists
    and then c2 moves to c2 within 8 lists only with the detector; a user who keeps
    clicking c0 (and now and then another category) keeps every count."""
    def crowd(bandit: CategoryBandit) -> None:
        show(bandit, "o", 100, None)
        for cat in CATS:
            for _ in range(20):
                bandit.click("o", cat)

    means = {}
    for h in (2.0, 0.0):
        bandit = CategoryBandit(CategoryExploreConfig(decay=1.0, change_threshold=h))
        crowd(bandit)
        show(bandit, "u", 30, "c0")
        show(bandit, "u", 8, "c2", start=30)
        a, b = bandit.posterior("u", CATS)
        means[h] = a / (a + b)
    assert means[2.0][2] > means[2.0][0]
    assert means[0.0][2] < means[0.0][0]

    counts = {}
    for h in (2.0, 0.0):
        bandit = CategoryBandit(CategoryExploreConfig(decay=1.0, change_threshold=h))
        crowd(bandit)
        for n in range(40):
            show(bandit, "held", 1, CATS[n % 4] if n % 5 == 4 else "c0", start=n)
        counts[h] = bandit.users["held"][1]
    assert counts[2.0] == counts[0.0]


def test_groups_stay_within_max_groups_and_the_memory_bound_counts_them() -> None:
    """The least recently updated groups are dropped past ``max_groups``; the flow's memory
    bound adds that many groups per user shard with ``group_prior`` on, and the change
    detector's per-user state with ``change_threshold`` on."""
    bandit = CategoryBandit(CategoryExploreConfig(group_prior=5.0, max_groups=2))
    for n in range(4):
        bandit.exposure("u", "a", 0, f"r{n}", attrs={"city": f"x{n}"})
    assert list(bandit.groups.groups) == ["city=x2", "city=x3"]
    bound_added(100, "category_group", {"group_prior": 20.0, "max_groups": 100},
                {"max_groups": 100})
    bound_added(1_000, "category_user_change", {"change_threshold": 2.0, "max_users": 1_000},
                {"max_users": 1_000})


def test_groups_and_the_change_detector_resume_equal_after_a_snapshot(world: World) -> None:
    """Through the shard: the user's attributes reach the group counts, and the groups and
    the users' change state survive the pickled recovery state (same list served)."""
    import pickle

    from events.model import User

    world.publish_all()
    config = CategoryExploreConfig(enabled=True, group_prior=20.0, change_threshold=2.0)
    shard = world.user_shard(category_explore=config)
    feed(shard, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]}) for item in ITEMS])
    warm_up(shard)
    events: list = [User(T0 - 1, user, {"age_bucket": "25-34", "score": 7})
                    for user in ("u1", "u2", "fan")]
    for n, user in enumerate(("u1", "u2", "fan")):
        for rep in range(3):
            ts = T0 + 10 * n + rep
            for pos, item in enumerate(ITEMS[:8]):
                events.append(Impression(ts, f"i:{user}:{rep}:{pos}", user, item,
                                         f"r:{user}:{rep}", pos))
            events.append(Feedback(ts + 1, user, ITEMS[3], "click", f"i:{user}:{rep}:3"))
    feed(shard, events)
    bandit = shard.server.categories.bandit
    group = bandit.groups.groups["age_bucket=25-34"]
    assert group[CATEGORY[ITEMS[3]]][0] == 9.0  # every user's click, in their group
    assert list(bandit.groups.groups) == ["age_bucket=25-34"]  # the number is no group
    assert len(bandit.users["fan"]) == 4  # the change detector's state

    resumed = pickle.loads(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    again = resumed.server.categories.bandit
    assert list(again.users.items()) == list(bandit.users.items())
    assert again.groups.groups == bandit.groups.groups
    here = ask(shard, "fan", ts=T0 + 50, request_id="q:resume")
    there = ask(resumed, "fan", ts=T0 + 50, request_id="q:resume")
    assert [(i["item_id"], i["propensity"]) for i in here["items"]] == [
        (i["item_id"], i["propensity"]) for i in there["items"]]


def test_the_shard_serves_a_newcomer_what_their_group_clicks(world: World) -> None:
    """Through the shard: users of age group "a" click c3, of "b" c0; newcomers shown one
    list each, without a click, are served more c3 when their ``user`` event says "a"
    (serving reads the attributes from the user's context); with ``group_prior`` off, the
    two newcomers get the same lists."""
    from events.model import User

    world.publish_all()
    by_cat = {c: [i for i in ITEMS if CATEGORY[i] == c] for c in CATS}
    shown = [by_cat[c][n] for n in range(2) for c in CATS]  # 8 items, 2 per category
    counts = {}
    for strength in (20.0, 0.0):
        shard = world.user_shard(category_explore=CategoryExploreConfig(
            enabled=True, group_prior=strength))
        feed(shard, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]})
                     for item in ITEMS])
        warm_up(shard)
        events: list = []
        users = [(f"o{n}", "a" if n % 2 else "b") for n in range(20)] + [
            ("new a", "a"), ("new b", "b")]
        for n, (user, group) in enumerate(users):
            ts = T0 - 600_000 + 100 * n
            events.append(User(ts, user, {"age_bucket": group}))
            for pos, item in enumerate(shown):
                events.append(Impression(ts + 1, f"i:{user}:{pos}", user, item, f"r:{user}", pos))
            if user.startswith("o"):
                pos = shown.index(by_cat["c3" if group == "a" else "c0"][0])
                events.append(Feedback(ts + 2, user, shown[pos], "click", f"i:{user}:{pos}"))
        feed(shard, events)

        def c3(user: str, shard=shard) -> int:
            return sum(sum(CATEGORY.get(i["item_id"]) == "c3" for i in
                           ask(shard, user, ts=T0 + n, request_id=f"q:{n}")["items"])
                       for n in range(20))

        counts[strength] = (c3("new a"), c3("new b"))
    assert counts[20.0][0] > counts[20.0][1] + 10
    assert counts[0.0][0] == counts[0.0][1]


@pytest.mark.parametrize("seed", range(5))
def test_coded_categories_order_as_the_category_names(seed: int) -> None:
    """Category sampling on the pool's category codes (``CodedCategories``: codes into
    the ``ItemRows`` names, None and "" both "no category", names in any order) gives
    the lists and propensities of the names themselves."""
    rng = np.random.default_rng(seed)
    table = [None, "c2", "", "c0", "c9", "c1"]
    codes = rng.integers(0, len(table), 120).astype(np.int32)
    names = [table[c] for c in codes.tolist()]
    assert [x.tolist() if isinstance(x, np.ndarray) else x for x in category_codes(
        CodedCategories(codes, table))] == [x.tolist() if isinstance(x, np.ndarray) else x
                                           for x in category_codes(names)]
    scores = rng.random(120)
    for mode in CATEGORY_MODES:
        bandit = CategoryBandit(CategoryExploreConfig(mode=mode))
        for cat in ("c2", "c9", None):
            show(bandit, "u", 3, cat)
        by_name = bandit.order("u", scores, names, 10, seed)
        by_code = bandit.order("u", scores, CodedCategories(codes, table), 10, seed)
        assert by_name is not None and by_code is not None
        assert by_name[0].tolist() == by_code[0].tolist()
        assert by_name[1].tolist() == by_code[1].tolist()


def test_best_by_row_is_the_stable_sorts_first_k_with_ties_and_nan() -> None:
    """``best_by_row`` (an unstable sort checked for ties) gives each row's first ``k``
    of the stable descending sort: on distinct keys, on keys tied inside the first
    ``k + 1`` (equal keys in position order), with -0.0 beside 0.0 and with NaN."""
    rng = np.random.default_rng(7)
    cases = [rng.random((17, 50)), np.repeat(rng.random((17, 25)), 2, axis=1),
             rng.integers(0, 4, (17, 50)).astype(np.float64),
             np.array([[0.0, -0.0, 0.0, 1.0], [-0.0, 0.0, 2.0, 2.0]]),
             np.array([[np.nan, 1.0, 0.5, np.nan], [0.3, np.nan, 0.3, 0.1]])]
    for key in cases:
        for k in (1, 3, 10, key.shape[1]):
            expected = (-key).argsort(axis=1, kind="stable")[:, :k]
            assert np.array_equal(best_by_row(key, k), expected)


def test_coded_categories_memo_follows_each_names_list_and_its_growth() -> None:
    """``category_codes``' per-process memo of a names list's code table: the same codes
    present in another names list (another id space) read that list's names, a list
    that grew reads its new codes' names, and a list made after the first is gone (its
    ``id`` possibly reused) reads its own; each answer is what the names give."""
    codes = np.array([1, 2, 2, 0, 1], np.int32)

    def by_names(table: list[str | None], at: np.ndarray) -> list[object]:
        return [x.tolist() if isinstance(x, np.ndarray) else x
                for x in category_codes([table[c] for c in at.tolist()])]

    def coded(table: list[str | None], at: np.ndarray) -> list[object]:
        return [x.tolist() if isinstance(x, np.ndarray) else x
                for x in category_codes(CodedCategories(at, table))]

    first: list[str | None] = [None, "b", "a"]
    assert coded(first, codes) == by_names(first, codes) == [["", "a", "b"], [2, 1, 1, 0, 2]]
    other: list[str | None] = [None, "z", "c"]
    assert coded(other, codes) == by_names(other, codes)
    first.append("0")  # ItemRows.categories only grows
    grown = np.append(codes, 3).astype(np.int32)
    assert coded(first, grown) == by_names(first, grown)
    assert coded(first, codes) == by_names(first, codes)
    del first, other
    for n in range(50):  # new lists, some at a freed list's address
        table: list[str | None] = [None, f"x{n}", f"w{n}"]
        assert coded(table, codes) == by_names(table, codes)
        out = category_codes(CodedCategories(codes, table))[0]
        out.append("mutated")  # a caller's list is its own
        assert coded(table, codes) == by_names(table, codes)


def test_a_user_without_exposures_costs_no_item_counts() -> None:
    """The serving glue answers None (the scorer's order) for a user the posteriors do
    not know before it reads any item counts (``rates``): a rating log such as
    MovieLens, where no user has exposures, reads none; a known user's list reads them."""
    scores, cats = pool()
    n = len(scores)
    candidates = CandidatePool(np.arange(n), [f"x{i}" for i in range(n)],
                               np.zeros((len(SOURCES), n)), np.zeros((len(SOURCES), n), bool),
                               scores, cats)
    asked: list[str] = []

    def rates(p: CandidatePool, names: list[str]) -> np.ndarray:
        asked.append("rates")
        return np.ones((len(names), len(p)))

    explore = CategoryExplore(CategoryExploreConfig())
    explore.bandit.click("u", "c1")  # a click alone is no exposure
    assert explore.order(Request(T0, "q", "u", 10), "u", candidates, rates=rates) is None
    assert asked == []
    show(explore.bandit, "u", 1, "c1")
    assert explore.order(Request(T0, "q2", "u", 10), "u", candidates, rates=rates) is not None
    assert asked == ["rates"]


def _posterior_reference(bandit: CategoryBandit, user_id: str, categories: list[str],
                         history: dict[str, float] | None, attrs: dict | None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``CategoryBandit.posterior`` as first written (one array per count kind, the tilt
    always multiplied, ``np.clip``): the fused form must give these floats."""
    from models.group_prior import group_keys

    clicks = sum(c[0] for c in bandit.totals.values())
    exposure = sum(c[1] for c in bandit.totals.values())
    overall = (clicks + 1.0) / (exposure + 2.0)
    s = bandit.config.prior_strength
    entry = bandit.users.get(user_id, ("", {}))
    n = len(categories)
    totals = np.array([bandit.totals.get(c, (0.0, 0.0)) for c in categories],
                      np.float64).reshape(n, 2)
    num, den = totals[:, 0] + s * overall, totals[:, 1] + s
    tilt = bandit.tilt(categories, history)
    groups = bandit._group_prior()
    if groups is not None and not bandit._moved(entry):
        tilt = tilt * groups.tilt(group_keys(attrs), categories, num / den)
    rate = np.clip(tilt * num / den, 1e-4, 1 - 1e-4)
    user = np.array([entry[1].get(c, (0.0, 0.0)) for c in categories], np.float64).reshape(n, 2)
    return s * rate + user[:, 0], s * (1.0 - rate) + np.maximum(user[:, 1] - user[:, 0], 0.0)


@pytest.mark.parametrize("history_prior,group_prior", [(0.0, 0.0), (3.0, 0.0), (0.0, 20.0),
                                                       (3.0, 20.0)])
def test_posterior_is_the_first_formula_bit_for_bit(history_prior: float,
                                                    group_prior: float) -> None:
    """With and without the history tilt and the group prior, for known and unknown
    users and categories (and none at all), the same floats as the formula it replaced."""
    rng = np.random.default_rng(5)
    bandit = CategoryBandit(CategoryExploreConfig(history_prior=history_prior,
                                                  group_prior=group_prior))
    for n in range(300):
        user, cat = f"u{n % 7}", CATS[int(rng.integers(len(CATS)))]
        attrs = {"age": "a" if n % 3 else "b"}
        bandit.exposure(user, cat, int(rng.integers(10)), f"{user}:{n // 20}", attrs=attrs)
        if rng.random() < 0.3:
            bandit.click(user, cat, attrs=attrs)
    cases = [(CATS, None), (CATS + ["never"], {"c1": 0.5, "c3": 1.25}), ([], None),
             (list(reversed(CATS)), {"c0": 2.0})]
    for user in ("u1", "u4", "stranger"):
        for categories, history in cases:
            for attrs in ({"age": "a"}, None):
                got = bandit.posterior(user, categories, history, attrs)
                want = _posterior_reference(bandit, user, categories, history, attrs)
                assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_posterior_memo_follows_every_count_change() -> None:
    """The per-user posterior memo (retrieval's pick and the ordering of one request
    compute it once) is void after any exposure, click or organic signal of any user:
    after each, every user's posterior is the first formula's floats again."""
    rng = np.random.default_rng(9)
    bandit = CategoryBandit(CategoryExploreConfig())
    users = ["u0", "u1", "u2"]
    for n in range(200):
        user, cat = users[n % 3], CATS[int(rng.integers(len(CATS)))]
        kind = n % 5
        if kind < 3:
            bandit.exposure(user, cat, int(rng.integers(10)), f"{user}:{n // 9}")
        elif kind == 3:
            bandit.click(user, cat)
        else:
            bandit.organic(user, cat, 0.5)
        for asker in (users[n % 2], "u2", users[n % 2]):  # the memo kept and switched
            for categories in (CATS, list(reversed(CATS))[:3] + ["never"]):
                got = bandit.posterior(asker, categories)
                want = _posterior_reference(bandit, asker, categories, None, None)
                assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_explore_slots_show_the_sampled_category_the_scorer_ranks_too_low() -> None:
    """``explore_slots``: a category the user's clicks favour but whose items the scorer
    ranks below its best ``depth`` is never served by the sampled order alone; with one
    explore slot its best candidate takes the list's last slot whenever the request's
    draw ranks it first, and the other slots stay the sampled order's."""
    cats = ["c0"] * 30 + ["c3"] * 10
    scores = np.linspace(1.0, 0.0, len(cats))  # every c3 item below the best 30
    served = {}
    for slots in (0, 1):
        bandit = CategoryBandit(CategoryExploreConfig(depth=20, explore_slots=slots))
        show(bandit, "u", 3, "c3")
        lists = [bandit.order("u", scores, cats, 10, seed) for seed in range(100)]
        served[slots] = [out[0].tolist() for out in lists if out is not None]
    assert all(cats[i] == "c0" for row in served[0] for i in row)
    with_c3 = [row for row in served[1] if any(cats[i] == "c3" for i in row)]
    assert len(with_c3) > 50  # the clicks made c3 the usual first draw
    for row, plain in zip(served[1], served[0], strict=True):
        assert row[:9] == plain[:9] and len(set(row)) == 10
        if row in with_c3:
            assert row[9] == 30  # c3's best candidate (the scorer's first c3 item)


def test_explore_slots_leave_a_list_that_has_the_sampled_category_alone() -> None:
    """An explore slot changes nothing when the sampled order already shows the category
    of the request's highest draw (every category within the scorer's best)."""
    scores, cats = pool()
    for seed in range(30):
        lists = []
        for slots in (0, 1):
            bandit = CategoryBandit(CategoryExploreConfig(explore_slots=slots))
            show(bandit, "u", 3, "c1")
            lists.append(bandit.order("u", scores, cats, 10, seed))
        assert lists[0][0].tolist() == lists[1][0].tolist()
        assert lists[0][1].tolist() == lists[1][1].tolist()


def test_half_life_fades_the_counts_of_a_user_who_comes_back_late() -> None:
    """``half_life_s``: a user clicked c0 in 6 lists a minute apart, then comes back a day
    later and clicks c2 once (the shard's rates alike); with a half-life of an hour the old
    counts have faded and c2 leads, forgetting per list only (0) keeps c0 ahead; a user
    back after a second keeps the same counts either way."""
    minute, day = 60_000, 86_400_000
    means = {}
    for half_life in (3_600.0, 0.0):
        bandit = CategoryBandit(CategoryExploreConfig(half_life_s=half_life))
        alike_shard(bandit)
        for gap, user in ((day, "late"), (1_000, "soon")):
            for n in range(6):
                for pos in range(8):
                    bandit.exposure(user, CATS[pos % 4], pos, f"{user}:{n}", ts=T0 + n * minute)
                bandit.click(user, "c0")
            back = T0 + 5 * minute + gap
            for pos in range(8):
                bandit.exposure(user, CATS[pos % 4], pos, f"{user}:back", ts=back)
            bandit.click(user, "c2")
            a, b = bandit.posterior(user, CATS)
            means[half_life, user] = a / (a + b)
    assert means[3_600.0, "late"][2] > means[3_600.0, "late"][0]
    assert means[0.0, "late"][0] > means[0.0, "late"][2]  # the control
    assert means[3_600.0, "soon"][0] > means[3_600.0, "soon"][2]
    assert means[3_600.0, "soon"] == pytest.approx(means[0.0, "soon"], rel=0.02)


def test_list_times_stay_within_max_users_and_the_memory_bound_counts_them() -> None:
    """``half_life_s``'s event time per user is dropped with the user past ``max_users``;
    the memory bound adds it per user when on."""
    bandit = CategoryBandit(CategoryExploreConfig(half_life_s=60.0, max_users=2))
    for u in range(4):
        bandit.exposure(f"u{u}", "a", 0, f"r{u}", ts=T0 + u)
    assert list(bandit.list_ts) == ["u2", "u3"] == list(bandit.users)
    bound_added(1_000, "category_user_time", {"half_life_s": 600.0, "max_users": 1_000},
                {"max_users": 1_000})


def test_ranker_feature_is_the_posterior_lift_at_serving_and_in_the_examples(
        world: World) -> None:
    """``ranker_feature``: the LR's ``category_posterior`` of each candidate is the user's
    posterior mean a / (a + b) of the candidate's category over the shard's overall rate,
    as the bandit holds them when serving scores the pool, and each example of that
    request's impressions carries the same value (taken before the impressions teach the
    posteriors; computed from a detached capture here); a user never shown anything has
    none; off, no column. The recovery state keeps the feature wired."""
    import pickle

    from operators.point_in_time import CATEGORY_POSTERIOR

    world.publish_all()
    shard = world.user_shard(category_explore=CategoryExploreConfig(enabled=True,
                                                                    ranker_feature=True))
    plain = world.user_shard(category_explore=CategoryExploreConfig(enabled=True,
                                                                    ranker_feature=False))
    events: list = []
    for rep in range(3):  # "fan" clicks c3 items
        ts = T0 - 600_000 + rep * 1000
        for pos, item in enumerate(ITEMS[:8]):
            events.append(Impression(ts, f"i:fan:{rep}:{pos}", "fan", item, f"r:fan:{rep}", pos))
        events.append(Feedback(ts + 10, "fan", ITEMS[3], "click", f"i:fan:{rep}:3"))
    for s in (shard, plain):
        feed(s, [Item(T0 - 3_600_000, item, {"category": CATEGORY[item]}) for item in ITEMS])
        warm_up(s)
        feed(s, events)
    bandit = shard.server.categories.bandit

    def expected(user: str) -> dict[str, float]:  # "": an item the shard's catalog lacks
        a, b = bandit.posterior(user, [*CATS, ""])
        clicks, exposure = bandit._shard_counts()
        overall = (clicks + 1.0) / (exposure + 2.0)
        return dict(zip([*CATS, ""], (a / (a + b) / overall).tolist(), strict=True))

    seen: list = []
    for s in (shard, plain):
        columns = s.server.pool_columns

        def spy(*args, columns=columns):  # type: ignore[no-untyped-def]
            cols = columns(*args)
            seen.append((args[1].user_id, cols))
            return cols
        s.server.pool_columns = spy
    means = expected("fan")
    assert means["c3"] > max(means["c0"], means["c1"]) + 0.5  # the control: it moved
    record = ask(shard, "fan", ts=T0, request_id="q:fan")
    user, cols = seen[-1]
    assert user == "fan"
    assert cols.numeric[CATEGORY_POSTERIOR].tolist() == [
        means[CATEGORY.get(item, "")] for item in cols.item_ids]
    ask(shard, "cold", ts=T0 + 1, request_id="q:cold")
    assert seen[-1][0] == "cold" and CATEGORY_POSTERIOR not in seen[-1][1].numeric
    ask(plain, "fan", ts=T0, request_id="q:fan")
    assert seen[-1][0] == "fan" and CATEGORY_POSTERIOR not in seen[-1][1].numeric

    # The request's impressions and a click: every example carries the serving value.
    served = [i["item_id"] for i in record["items"]]
    imps: list = [Impression(T0 + 5, f"i:q:{pos}", "fan", item, "q:fan", pos)
                  for pos, item in enumerate(served)]
    out = feed(shard, imps)
    taken = shard.context._taken
    shard.context.release_frozen()  # their snapshot version let go: computed from a capture
    assert taken is not None and taken.detached is not None
    out2 = feed(shard, [Feedback(T0 + 20, "fan", served[0], "click", "i:q:0")])
    examples = (out.get("examples", []) + out2.get("examples", [])
                + shard.flush().get("examples", []))
    mine = [e for e in examples if e["example_id"].startswith("imp:i:q:")]
    assert len(mine) == len(served)
    for e in mine:
        assert e["features"][CATEGORY_POSTERIOR] == pytest.approx(
            means[CATEGORY.get(e["item_id"], "")], rel=1e-6)
    assert expected("fan") != means  # the impressions taught the posteriors after

    del shard.server.pool_columns  # the spy (a local function does not pickle)
    resumed = pickle.loads(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))
    assert resumed.context.category_lifts.__self__ is resumed.server.categories.bandit
