"""Serving's request path after the call diet (docs/evaluation.md, serve13b): each
shortened form equals the longer one it replaced, value for value (bitwise floats)."""

from __future__ import annotations

import math
import pickle
import random
import struct

import numpy as np

from models.category_bandit import CategoryBandit, CategoryExploreConfig, CodedCategories
from operators.candidates import SOURCES, Candidate, CandidatePool, round_to
from operators.category_explore import category_scores
from operators.category_items import CategoryList


def _pool(n: int = 12, seed: int = 0) -> CandidatePool:
    rng = np.random.default_rng(seed)
    has = rng.random((len(SOURCES), n)) < 0.4
    scores = np.where(has, rng.random((len(SOURCES), n)), 0.0)
    pool = CandidatePool(np.arange(n), [f"i{j}" for j in range(n)], scores, has,
                         rng.random(n))
    pool.coded = CodedCategories(rng.integers(0, 3, n), ["a", "b", "c"])
    return pool


def _by_elements(pool: CandidatePool, idx: np.ndarray) -> list[Candidate]:
    """The per-element construction the pool used before (numpy scalar reads)."""
    out = []
    for i in idx.tolist():
        srcs, by_source = [], {}
        for n, s in enumerate(SOURCES):
            if pool.has[n, i]:
                srcs.append(s)
                by_source[s] = float(pool.scores[n, i])
        out.append(Candidate(pool.items[i], srcs, by_source, float(pool.score[i]),
                             pool.coded.names[pool.coded.codes[i]]))
    return out


def test_candidates_of_positions_equal_the_element_reads() -> None:
    pool = _pool()
    idx = np.array([5, 0, 11, 3, 3])
    assert pool.candidates(idx) == _by_elements(pool, idx)
    assert pool.candidates() == _by_elements(pool, np.arange(len(pool)))


def test_category_scores_equal_one_product_per_category() -> None:
    rng = np.random.default_rng(1)
    lists = {name: CategoryList(1.0, 2.0, [f"{name}{j}" for j in range(size)], np.zeros(size),
                                np.zeros(size), rng.random(size) * 3)
             for name, size in (("a", 5), ("b", 2), ("c", 9))}
    picks = [("c", np.float64(0.37)), ("a", np.float64(0.11)), ("b", np.float64(0.9))]
    per = 4
    expected = np.concatenate([mean * lists[name].lift[:per] for name, mean in picks])
    got = category_scores(picks, lists, per)
    assert got.dtype == np.float64
    assert got.tobytes() == expected.tobytes()


def test_untilted_posteriors_from_the_memo_equal_the_first_computation() -> None:
    bandit = CategoryBandit(CategoryExploreConfig())
    for n in range(6):
        for pos, cat in enumerate(["a", "b", "c", "a"]):
            bandit.exposure("u", cat, pos, f"u:{n}")
        bandit.click("u", "a" if n % 2 else "c")
    names = ["c", "a", "zz", "a", "b"]  # one unknown, one twice
    first = bandit.posterior("u", names)
    again = bandit.posterior("u", names)  # every pair from the memo
    for got, want in zip(again, first, strict=True):
        assert got.tobytes() == want.tobytes()
    # the Python-float formula of each category on its own counts
    s = bandit.config.prior_strength
    clicks = sum(c[0] for c in bandit.totals.values())
    shown = sum(c[1] for c in bandit.totals.values())
    prior = s * ((clicks + 1.0) / (shown + 2.0))
    counts = bandit.users["u"][1]
    for j, c in enumerate(names):
        tc, te = bandit.totals.get(c, (0.0, 0.0))
        uc, ue = counts.get(c, (0.0, 0.0))
        rate = min(max((tc + prior) / (te + s), 1e-4), 1 - 1e-4)
        assert first[0][j] == s * rate + uc
        assert first[1][j] == s * (1.0 - rate) + max(ue - uc, 0.0)
    assert first[0].flags.c_contiguous and first[1].flags.c_contiguous


def test_record_items_equal_the_records_of_the_candidates() -> None:
    """``CandidatePool.record_items`` (serve14: the record straight from the arrays)
    gives the dicts ``Server.recommend`` makes of ``candidates(idx)`` with their
    propensities: every source pattern, propensities given or 1.0."""
    for seed in range(4):
        pool = _pool(40, seed)
        idx = np.random.default_rng(seed).permutation(40)[:10]
        for props in (None, [0.125 * (j + 1) / 3 for j in range(10)]):
            cands = pool.candidates(idx)
            for c, p in zip(cands, props or [1.0] * 10, strict=True):
                c.propensity = p
            want = [{"item_id": c.item_id, "score": round(c.score, 6), "source": c.source,
                     "propensity": round(c.propensity, 6)} for c in cands]
            assert pool.record_items(idx, props) == want


def test_round_to_is_round_bit_for_bit() -> None:
    """``round_to`` (the records' rounding without a decimal string) gives ``round``'s
    float, bit for bit (the sign of a zero too), on seeded values of every magnitude,
    on decimal halves and their neighbours, and on the values it leaves to ``round``;
    a numpy scalar gets numpy's own rounding, as ``round`` gives it."""
    rng = random.Random(18)
    values = [rng.random() for _ in range(20_000)]
    values += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 12) for _ in range(20_000)]
    for d in (3, 4, 6):
        for k in range(-2_000, 2_000):
            half = (k + 0.5) / 10**d  # the float nearest a decimal half, and its neighbours
            values += [half, math.nextafter(half, math.inf), math.nextafter(half, -math.inf),
                       k / 10**d]
    values += [0.0, -0.0, 5e-7, -5e-7, 4e-7, -4e-7, 1e-300, -1e-300, 2.0**30, 2.0**60,
               math.inf, -math.inf, 0.1234565, 1.0000005, 2.5e-6]
    for d in (0, 3, 4, 6):
        for x in values:
            assert struct.pack("<d", round_to(x, d)) == struct.pack("<d", round(x, d)), (x, d)
    assert math.isnan(round_to(math.nan, 6))
    x = np.float64(0.1234565)
    assert round_to(x, 6) == round(x, 6) and type(round_to(x, 6)) is type(round(x, 6))


def _lifts_of(bandit: CategoryBandit, user: str) -> dict[str, float]:
    """``lifts``' values by ``posterior``'s arrays (the form before us15)."""
    names = [*bandit.totals, *([""] if "" not in bandit.totals else [])]
    a, b = bandit.posterior(user, names)
    clicks = sum(c[0] for c in bandit.totals.values())
    shown = sum(c[1] for c in bandit.totals.values())
    overall = min(max((clicks + 1.0) / (shown + 2.0), 1e-4), 1 - 1e-4)
    return dict(zip(names, (a / (a + b) / overall).tolist(), strict=True))


def test_lifts_equal_the_posterior_means_and_are_shared_until_the_counts_change() -> None:
    """``CategoryBandit.lifts`` (us15: Python floats on the untilted path, one copy shared
    while nothing is counted) equals ``a / (a + b) / overall`` of ``posterior``'s arrays,
    bitwise, with and without the group prior's tilt."""
    for group_prior in (0.0, 5.0):
        bandit = CategoryBandit(CategoryExploreConfig(group_prior=group_prior))
        attrs = {"country": "fr"}
        for n in range(5):
            for pos, cat in enumerate(["a", "b", None, "a"]):
                bandit.exposure("u", cat, pos, f"u:{n}", attrs=attrs)
                bandit.exposure("v", cat, pos + 1, f"v:{n}", attrs=attrs)
            bandit.click("u", "a" if n % 2 else None, attrs=attrs)

        first = bandit.lifts("u")
        assert first is not None and first.by_key == _lifts_of(bandit, "u")
        assert bandit.lifts("u") is first  # nothing counted since: the same copy
        other = bandit.lifts("v")
        assert other is not None and other.by_key == _lifts_of(bandit, "v")
        assert bandit.lifts("u") is not first and bandit.lifts("u").by_key == first.by_key
        assert bandit.lifts("nobody") is None
        kept = dict(first.by_key)
        bandit.exposure("u", "b", 0, "u:9", attrs=attrs)
        after = bandit.lifts("u")
        assert after is not None and after.by_key == _lifts_of(bandit, "u") != kept
        assert first.by_key == kept  # a copy: later counts do not change it
        resumed = pickle.loads(pickle.dumps(bandit))
        assert "_lifts_memo" not in resumed.__dict__
        assert resumed.lifts("u").by_key == after.by_key
