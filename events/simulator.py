"""Seeded synthetic event simulator (pure Python + numpy, no Bytewax).

Produces the five event types of docs/events.md (``impression``, ``feedback``,
``request``, ``item``, ``user``) as plain dicts, in non-decreasing event time
(``ts``, integer epoch milliseconds), from a hidden model that makes ranking and
retrieval learnable:

* users and items have latent taste vectors (``dim``); items are clustered around
  per-category centroids, users around the centroid of a favourite category;
* users are active with Zipf weights, items have Zipf popularity;
* every request gets ``k`` impressions chosen by a logging policy that mixes
  popularity sampling with uniform random sampling (open loop);
* click probability = sigmoid(b0 + affinity_scale * u.v + item bias - eta * ln(1 + position)),
  with the global offset ``b0`` calibrated so the overall click rate is ``target_ctr``;
* clicks arrive a few seconds after the impression, likes / purchases / dwell later;
* user tastes drift (an Ornstein-Uhlenbeck-like mixing at ``drift_per_day``) and can
  shift abruptly at ``drift_at``;
* items churn: new items are announced by an ``item`` event before they are shown,
  retired items get ``available: false`` and are never shown afterwards;
* a small fraction of feedback is organic (no ``impression_id``): ratings and
  search clicks.

Everything is deterministic from ``seed``. :meth:`Simulator.snapshot` returns a small
picklable state (RNG states, counters, pending events, current vectors) from which
:meth:`Simulator.restore` continues exactly. See ``docs/simulator.md``.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from events.logfile import open_log_for_write

__all__ = ["DEFAULT_START_TS_MS", "SimConfig", "Simulator", "write_log"]

DEFAULT_START_TS_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z in epoch milliseconds."""

_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
COUNTRIES = ("US", "DE", "GB", "FR", "BR", "IN", "JP", "ES", "IT", "NL")
_COUNTRY_WEIGHTS = np.array([0.25, 0.15, 0.12, 0.1, 0.09, 0.09, 0.07, 0.05, 0.04, 0.04])
DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_WEIGHTS = np.array([0.6, 0.3, 0.1])

_SNAPSHOT_VERSION = 1
_TS = itemgetter("ts")


@dataclass
class SimConfig:
    """Parameters of the simulated world. Times are event time.

    Population
        n_users: number of users (IDs ``u0`` .. ``u{n_users-1}``).
        n_items: initial catalogue size (IDs ``i0`` ..; new items continue the count).
        n_categories: item categories (``c0`` ..); item vectors cluster by category.
        dim: dimension of the latent taste vectors.
        user_activity_zipf: Zipf exponent of user activity (weight of the r-th most
            active user ~ r^-s); 0 = uniform.
        item_popularity_zipf: Zipf exponent of item popularity used by the logging
            policy (and, via ``popularity_click_weight``, by the click model).
        taste_spread: spread of user vectors around their favourite category
            centroid, relative to the centroid norm (~1).
        item_spread: spread of item vectors around their category centroid (relative).

    Requests and logging policy
        k: impressions per request (positions 0 .. k-1).
        requests_per_s: mean request rate, requests per event-time second (Poisson).
        start_ts_ms: event time of the first event, epoch milliseconds.
        policy_popularity_share: probability that a slot is filled by popularity
            sampling; otherwise uniformly among available items.
        policy_sort_by_popularity: if True the slate is ordered by descending
            popularity (position confounded with popularity); else in sampled order.
        impression_delay_ms: impressions are logged this many ms after their request.

    Click model
        target_ctr: global click rate (clicks / impressions) that the offset ``b0``
            is calibrated to at start, fraction in (0, 1).
        affinity_scale: log-odds per unit of the dot product u.v.
        item_bias_std: standard deviation of the per-item log-odds bias.
        popularity_click_weight: log-odds added per standard deviation of
            log-popularity (popular items are also somewhat more clickable).
        position_bias_eta: click odds at position p are multiplied by (1 + p)^-eta.
        calibration_requests: requests simulated (with a separate RNG) to calibrate b0.

    Feedback
        click_delay_min_s / click_delay_mean_s: click delay after the impression is
            min + Exponential(mean), seconds.
        like_given_click: base P(like | click), scaled per user-item pair by
            2 * sigmoid(affinity) (capped at 1; clicked pairs have high affinity, so the
            observed rate is higher, ~0.29 at the defaults); the like comes
            Exponential(like_delay_mean_s) seconds after the click.
        purchase_given_click / purchase_delay_mean_s: same for purchases (~0.028 observed).
        dwell_given_click: P(dwell event | click); the dwell ``value`` is seconds,
            1 + Exponential(dwell_mean_s), emitted at click + dwell.
        organic_per_request: expected organic interactions (feedback without
            impression_id) per request, by a random (activity-weighted) user.
        organic_rating_share: share of organic interactions that are ``rating``
            (value 1..5); the rest are ``click`` with context ``{"source": "search"}``.

    Drift
        drift_per_day: taste drift rate, per event-time day: the correlation of a
            user's vector with its value t days earlier is about exp(-drift_per_day * t).
            0 = frozen tastes.
        drift_step_s: drift is applied to all users every this many event seconds.
        drift_at: optional epoch ms of an abrupt taste shift: from then on a fraction
            ``drift_fraction`` of users has a freshly drawn taste (new favourite category).
        drift_fraction: fraction of users affected by ``drift_at``, in [0, 1].

    Catalogue churn
        items_added_per_hour: new items per event-time hour (Poisson).
        items_retired_per_hour: retired items per event-time hour (Poisson); never
            below ``min_available_items`` available items.
        min_available_items: floor on the available catalogue (None = 2 * k).
        emit_initial_items: emit an ``item`` event for every initial item at start_ts_ms.
    """

    n_users: int = 1000
    n_items: int = 500
    n_categories: int = 10
    dim: int = 8
    k: int = 10
    target_ctr: float = 0.03
    requests_per_s: float = 50.0
    start_ts_ms: int = DEFAULT_START_TS_MS
    user_activity_zipf: float = 1.0
    item_popularity_zipf: float = 1.0
    taste_spread: float = 0.5
    item_spread: float = 0.5
    policy_popularity_share: float = 0.7
    policy_sort_by_popularity: bool = False
    impression_delay_ms: int = 20
    affinity_scale: float = 3.0
    item_bias_std: float = 0.5
    popularity_click_weight: float = 0.3
    position_bias_eta: float = 1.0
    calibration_requests: int = 2000
    click_delay_min_s: float = 1.0
    click_delay_mean_s: float = 5.0
    like_given_click: float = 0.2
    like_delay_mean_s: float = 60.0
    purchase_given_click: float = 0.05
    purchase_delay_mean_s: float = 600.0
    dwell_given_click: float = 0.3
    dwell_mean_s: float = 30.0
    organic_per_request: float = 0.02
    organic_rating_share: float = 0.5
    drift_per_day: float = 0.1
    drift_step_s: float = 60.0
    drift_at: int | None = None
    drift_fraction: float = 1.0
    items_added_per_hour: float = 30.0
    items_retired_per_hour: float = 30.0
    min_available_items: int | None = None
    emit_initial_items: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent configuration."""
        if self.n_users < 1 or self.n_categories < 1 or self.dim < 1 or self.k < 1:
            raise ValueError("n_users, n_categories, dim and k must be >= 1")
        if self.n_items < self.k:
            raise ValueError(f"n_items ({self.n_items}) must be >= k ({self.k})")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError("target_ctr must be in (0, 1)")
        if self.requests_per_s <= 0:
            raise ValueError("requests_per_s must be > 0")
        if self.drift_step_s <= 0:
            raise ValueError("drift_step_s must be > 0")
        for name in ("policy_popularity_share", "drift_fraction", "organic_rating_share",
                     "like_given_click", "purchase_given_click", "dwell_given_click"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in ("organic_per_request", "drift_per_day", "items_added_per_hour",
                     "items_retired_per_hour", "click_delay_min_s", "click_delay_mean_s",
                     "like_delay_mean_s", "purchase_delay_mean_s", "dwell_mean_s",
                     "impression_delay_ms", "user_activity_zipf", "item_popularity_zipf"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.organic_per_request > 1.0:
            raise ValueError("organic_per_request must be <= 1")
        if self.min_available_items is not None and self.min_available_items < self.k:
            raise ValueError("min_available_items must be >= k")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_weights(rng: np.random.Generator, n: int, s: float) -> np.ndarray:
    """Zipf weights r^-s over a random permutation of ``n`` entities."""
    ranks = rng.permutation(n) + 1.0
    return ranks ** (-s)


class Simulator:
    """Seeded generator of a synthetic recommender event stream.

    Args:
        config: world parameters (``SimConfig()`` when None).
        seed: RNG seed; same seed and config give the identical stream.
        max_events: stop after exactly this many events (None = endless). A finite
            stream is the prefix of the endless stream with the same seed.
    """

    _BLOCK_REQUESTS = 64

    def __init__(self, config: SimConfig | None = None, seed: int = 0,
                 max_events: int | None = None) -> None:
        cfg = copy.deepcopy(config) if config is not None else SimConfig()
        cfg.validate()
        if max_events is not None and max_events < 0:
            raise ValueError("max_events must be >= 0 or None")
        self.config = cfg
        self.seed = int(seed)
        self.max_events = max_events
        ss = np.random.SeedSequence(self.seed)
        world_ss, main_ss, cal_ss, resp_ss = ss.spawn(4)
        world = np.random.default_rng(world_ss)
        self._rng = np.random.default_rng(main_ss)
        self._resp_rng = np.random.default_rng(resp_ss)
        d, C = cfg.dim, cfg.n_categories

        # World: centroids (norm ~1), users, items.
        self._centroids = world.normal(0.0, 1.0 / math.sqrt(d), size=(C, d))
        self._user_fav = world.integers(0, C, size=cfg.n_users)
        self._U = self._draw_tastes(world, self._user_fav)
        self._U_shift: np.ndarray | None = None
        if cfg.drift_at is not None:
            shifted = self._draw_tastes(world, world.integers(0, C, size=cfg.n_users))
            keep = world.random(cfg.n_users) >= cfg.drift_fraction
            shifted[keep] = self._U[keep]
            self._U_shift = shifted
        age_rand = world.integers(0, len(AGE_BUCKETS), size=cfg.n_users)
        age_fav = self._user_fav % len(AGE_BUCKETS)
        self._user_age = np.where(world.random(cfg.n_users) < 0.6, age_fav, age_rand)
        self._user_country = world.choice(len(COUNTRIES), size=cfg.n_users,
                                          p=_COUNTRY_WEIGHTS / _COUNTRY_WEIGHTS.sum())
        uw = _zipf_weights(world, cfg.n_users, cfg.user_activity_zipf)
        self._user_cdf = np.cumsum(uw / uw.sum())
        self._user_cdf[-1] = 1.0
        self._user_seen = bytearray(cfg.n_users)

        n = cfg.n_items
        cap = max(16, 2 * n)
        self._n_items = 0
        self._V = np.zeros((cap, d))
        self._item_cat = np.zeros(cap, dtype=np.int64)
        self._item_z = np.zeros(cap)  # standard normal part of the item bias
        self._item_w = np.zeros(cap)  # popularity weight
        self._item_price = np.zeros(cap)
        self._item_avail = np.zeros(cap, dtype=bool)
        self._cat_price = np.exp(world.normal(3.0, 0.6, size=C))
        # log of the Zipf weight r^-s of a uniformly random rank r in 1..n has mean
        # about -s (ln n - 1) and standard deviation about s: used to standardise.
        self._log_w_mean = -cfg.item_popularity_zipf * (math.log(n) - 1.0) if n > 1 else 0.0
        self._log_w_std = max(cfg.item_popularity_zipf, 1e-9)
        ranks = world.permutation(n) + 1.0
        self._add_items(world, n, ranks)

        # Position bias, log-odds per position.
        self._pos_term = -cfg.position_bias_eta * np.log1p(np.arange(cfg.k))

        # Clock and scheduling (event time, float ms).
        self._t = float(cfg.start_ts_ms)
        self._next_add = self._t + self._exp_gap(cfg.items_added_per_hour)
        self._next_retire = self._t + self._exp_gap(cfg.items_retired_per_hour)
        self._next_drift = (self._t + cfg.drift_step_s * 1000.0) if cfg.drift_per_day > 0 else math.inf
        self._last_drift = self._t
        self._started = False

        self._n_requests = 0
        self._n_impressions = 0
        self._n_resp_impressions = 0
        self._emitted = 0
        self._seq = 0
        self._heap: list[tuple[int, int, dict[str, Any]]] = []
        self._out: deque[dict[str, Any]] = deque()
        self._policy_dirty = True

        # Calibrate the global offset b0 (separate RNG: does not touch the stream).
        self._b0 = 0.0
        self._b0 = self._calibrate(np.random.default_rng(cal_ss))
        self._init_strings()

    # ------------------------------------------------------------------ world

    def _draw_tastes(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """Taste vectors around the centroids of ``cats``."""
        d = self.config.dim
        noise = rng.normal(0.0, 1.0 / math.sqrt(d), size=(len(cats), d))
        return self._centroids[cats] + self.config.taste_spread * noise

    def _exp_gap(self, per_hour: float) -> float:
        """Exponential waiting time (ms) for a Poisson process of ``per_hour`` events."""
        if per_hour <= 0:
            return math.inf
        return float(self._rng.exponential(_MS_PER_HOUR / per_hour))

    def _add_items(self, rng: np.random.Generator, n: int, ranks: np.ndarray) -> np.ndarray:
        """Create ``n`` items (popularity rank ``ranks``); returns their indices."""
        cfg = self.config
        start = self._n_items
        need = start + n
        cap = len(self._item_w)
        if need > cap:
            new_cap = max(need, 2 * cap)
            grow = new_cap - cap
            self._V = np.concatenate([self._V, np.zeros((grow, cfg.dim))])
            self._item_cat = np.concatenate([self._item_cat, np.zeros(grow, dtype=np.int64)])
            self._item_z = np.concatenate([self._item_z, np.zeros(grow)])
            self._item_w = np.concatenate([self._item_w, np.zeros(grow)])
            self._item_price = np.concatenate([self._item_price, np.zeros(grow)])
            self._item_avail = np.concatenate([self._item_avail, np.zeros(grow, dtype=bool)])
        idx = np.arange(start, need)
        cats = rng.integers(0, cfg.n_categories, size=n)
        noise = rng.normal(0.0, 1.0 / math.sqrt(cfg.dim), size=(n, cfg.dim))
        self._V[idx] = self._centroids[cats] + cfg.item_spread * noise
        self._item_cat[idx] = cats
        self._item_z[idx] = rng.normal(0.0, 1.0, size=n)
        self._item_w[idx] = ranks ** (-cfg.item_popularity_zipf)
        price = self._cat_price[cats] * np.exp(rng.normal(0.0, 0.3, size=n))
        self._item_price[idx] = np.round(price, 2)
        self._item_avail[idx] = True
        self._n_items = need
        self._policy_dirty = True
        return idx

    def _item_bias(self, idx: np.ndarray | int) -> np.ndarray | float:
        """Per-item log-odds bias (random part + popularity part)."""
        cfg = self.config
        logw = np.log(self._item_w[idx])
        return (cfg.item_bias_std * self._item_z[idx]
                + cfg.popularity_click_weight * (logw - self._log_w_mean) / self._log_w_std)

    def _init_strings(self) -> None:
        self._user_ids = [f"u{i}" for i in range(self.config.n_users)]
        self._item_ids = [f"i{i}" for i in range(self._n_items)]
        self._rid_prefix = f"r{self.seed}-"
        self._imp_prefix = f"imp{self.seed}-"
        self._resp_prefix = f"imp{self.seed}-c"

    def _refresh_policy(self) -> None:
        """Recompute the available-item index and the popularity CDF."""
        self._avail_idx = np.flatnonzero(self._item_avail[: self._n_items])
        w = self._item_w[self._avail_idx]
        cdf = np.cumsum(w)
        self._pop_cdf = cdf / cdf[-1]
        self._pop_cdf[-1] = 1.0
        self._policy_dirty = False

    def _tastes_at(self, ts_ms: float) -> np.ndarray:
        at = self.config.drift_at
        if self._U_shift is not None and at is not None and ts_ms >= at:
            return self._U_shift
        return self._U

    # ------------------------------------------------------------- policy

    def _sample_slates(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """``b`` slates of ``k`` distinct available items (item indices), shape (b, k)."""
        if self._policy_dirty:
            self._refresh_policy()
        cfg = self.config
        k = cfg.k
        m = 2 * k
        avail = self._avail_idx
        n_av = len(avail)
        r = rng.random((b, m))
        pop = np.searchsorted(self._pop_cdf, r)
        uni = (r * n_av).astype(np.int64)
        pick = np.where(rng.random((b, m)) < cfg.policy_popularity_share, pop, uni)
        np.minimum(pick, n_av - 1, out=pick)
        rows = avail[pick].tolist()
        out = []
        for row in rows:
            s = list(dict.fromkeys(row))
            if len(s) < k:
                have = set(s)
                while len(s) < k:
                    x = int(avail[int(rng.integers(0, n_av))])
                    if x not in have:
                        have.add(x)
                        s.append(x)
            out.append(s[:k])
        slates = np.array(out, dtype=np.int64).reshape(b, k)
        if cfg.policy_sort_by_popularity:
            order = np.argsort(-self._item_w[slates], axis=1, kind="stable")
            slates = np.take_along_axis(slates, order, axis=1)
        return slates

    def _affinity(self, U: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """affinity_scale * u.v for users (b,) x items (b, k) -> (b, k)."""
        uu = U[users]
        vv = self._V[items]
        return self.config.affinity_scale * np.matmul(vv, uu[:, :, None])[:, :, 0]

    def _calibrate(self, rng: np.random.Generator) -> float:
        """Offset b0 such that the mean click probability under the policy is target_ctr."""
        cfg = self.config
        n = max(1, cfg.calibration_requests)
        users = np.searchsorted(self._user_cdf, rng.random(n))
        slates = self._sample_slates(rng, n)
        logits = (self._affinity(self._U, users, slates) + self._item_bias(slates)
                  + self._pos_term[None, :]).ravel()
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(mid + logits).mean() < cfg.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # -------------------------------------------------------- generation

    def _item_event(self, idx: int, ts: int, available: bool) -> dict[str, Any]:
        return {"type": "item", "ts": ts, "item_id": self._item_ids[idx],
                "attrs": {"category": f"c{int(self._item_cat[idx])}",
                          "price": float(self._item_price[idx])},
                "available": available}

    def _user_event(self, u: int, ts: int) -> dict[str, Any]:
        return {"type": "user", "ts": ts, "user_id": self._user_ids[u],
                "attrs": {"age_bucket": AGE_BUCKETS[int(self._user_age[u])],
                          "country": COUNTRIES[int(self._user_country[u])]}}

    def _step(self) -> None:
        """Advance the world by one block of requests or one scheduled change."""
        new: list[dict[str, Any]] = []
        cfg = self.config
        if not self._started:
            self._started = True
            if cfg.emit_initial_items:
                ts0 = int(self._t)
                new.extend(self._item_event(i, ts0, True) for i in range(self._n_items))
        else:
            t_change = min(self._next_add, self._next_retire, self._next_drift)
            at = cfg.drift_at
            if at is not None and self._t < at:
                t_change = min(t_change, float(at))
            gaps = self._rng.exponential(1000.0 / cfg.requests_per_s, self._BLOCK_REQUESTS)
            times = self._t + np.cumsum(gaps)
            # Requests stop impression_delay_ms before a change, so that no impression
            # of a request made before a retirement is logged after it.
            nb = int(np.searchsorted(times, t_change - cfg.impression_delay_ms))
            if nb > 0:
                self._t = float(times[nb - 1])
                self._gen_requests(times[:nb], new)
            else:
                # Poisson arrivals are memoryless: restarting at the change is exact.
                self._t = t_change
                self._apply_change(t_change, new)
        self._flush(new)

    def _apply_change(self, t: float, new: list[dict[str, Any]]) -> None:
        cfg = self.config
        ts = int(t)
        if t == self._next_drift:
            dt_days = (t - self._last_drift) / _MS_PER_DAY
            self._last_drift = t
            c = math.exp(-cfg.drift_per_day * dt_days)
            s = math.sqrt(max(0.0, 1.0 - c * c))
            # Mean-reverting mix with a fresh taste draw z: u' = m + c(u - m) + s(z - m),
            # m = mean taste, keeps the taste distribution (mean and covariance) stationary.
            z = self._draw_tastes(self._rng, self._rng.integers(0, cfg.n_categories, cfg.n_users))
            noise = s * z + (1.0 - c - s) * self._centroids.mean(axis=0)
            self._U = c * self._U + noise
            if self._U_shift is not None:
                self._U_shift = c * self._U_shift + noise
            self._next_drift = t + cfg.drift_step_s * 1000.0
        if t == self._next_add:
            rank = float(self._rng.integers(1, cfg.n_items + 1))
            idx = int(self._add_items(self._rng, 1, np.array([rank]))[0])
            self._item_ids.append(f"i{idx}")
            new.append(self._item_event(idx, ts, True))
            self._next_add = t + self._exp_gap(cfg.items_added_per_hour)
        if t == self._next_retire:
            if self._policy_dirty:
                self._refresh_policy()
            floor = cfg.min_available_items if cfg.min_available_items is not None else 2 * cfg.k
            if len(self._avail_idx) > floor:
                idx = int(self._avail_idx[int(self._rng.integers(0, len(self._avail_idx)))])
                self._item_avail[idx] = False
                self._policy_dirty = True
                new.append(self._item_event(idx, ts, False))
            self._next_retire = t + self._exp_gap(cfg.items_retired_per_hour)
        # drift_at itself needs no action: the tastes are chosen by request time.

    def _gen_requests(self, times: np.ndarray, new: list[dict[str, Any]]) -> None:
        """Requests at ``times`` (float ms) with their impressions and feedback."""
        cfg = self.config
        rng = self._rng
        b = len(times)
        k = cfg.k
        users = np.searchsorted(self._user_cdf, rng.random(b))
        devices = np.searchsorted(np.cumsum(_DEVICE_WEIGHTS), rng.random(b) * _DEVICE_WEIGHTS.sum())
        slates = self._sample_slates(rng, b)
        U = self._tastes_at(float(times[0]))
        aff = self._affinity(U, users, slates)
        logit = self._b0 + aff + self._item_bias(slates) + self._pos_term[None, :]
        clicks = rng.random((b, k)) < _sigmoid(logit)
        org_rows = np.flatnonzero(rng.random(b) < cfg.organic_per_request)
        organic = self._organic(org_rows, times[org_rows].astype(np.int64), U) if len(org_rows) else {}

        ts_list = times.astype(np.int64).tolist()
        users_l = users.tolist()
        dev_l = devices.tolist()
        slates_l = slates.tolist()
        uids = self._user_ids
        iids = self._item_ids
        seen = self._user_seen
        rp = self._rid_prefix
        ip = self._imp_prefix
        req0 = self._n_requests
        imp0 = self._n_impressions
        imp_delay = cfg.impression_delay_ms
        for j in range(b):
            ts = ts_list[j]
            u = users_l[j]
            uid = uids[u]
            if not seen[u]:
                seen[u] = 1
                new.append(self._user_event(u, ts))
            rid = f"{rp}{req0 + j}"
            dev = DEVICES[dev_l[j]]
            hour = (ts // _MS_PER_HOUR) % 24
            new.append({"type": "request", "ts": ts, "request_id": rid, "user_id": uid,
                        "k": k, "context": {"device": dev, "hour": hour}})
            its = ts + imp_delay
            base = imp0 + j * k
            for p, it in enumerate(slates_l[j]):
                new.append({"type": "impression", "ts": its, "impression_id": f"{ip}{base + p}",
                            "user_id": uid, "item_id": iids[it], "request_id": rid,
                            "position": p, "context": {"device": dev, "hour": hour}})
            if organic and j in organic:
                ou, oev = organic[j]
                if not seen[ou]:
                    seen[ou] = 1
                    new.append(self._user_event(ou, ts))
                new.append(oev)
        self._n_requests = req0 + b
        self._n_impressions = imp0 + b * k

        ci, cp = np.nonzero(clicks)
        if len(ci):
            imp_ts = times[ci].astype(np.int64) + imp_delay
            fb = self._feedback_events(
                users[ci], slates[ci, cp], aff[ci, cp], imp_ts,
                [f"{ip}{imp0 + j * k + p}" for j, p in zip(ci.tolist(), cp.tolist(), strict=True)],
                rng)
            new.extend(fb)

    def _feedback_events(self, users: np.ndarray, items: np.ndarray, aff: np.ndarray,
                         imp_ts: np.ndarray, imp_ids: list[str],
                         rng: np.random.Generator) -> list[dict[str, Any]]:
        """Click (and like / purchase / dwell) events for clicked impressions."""
        cfg = self.config
        n = len(users)
        click_ts = imp_ts + np.maximum(
            1, (cfg.click_delay_min_s * 1000.0 + rng.exponential(cfg.click_delay_mean_s * 1000.0, n))
        ).astype(np.int64)
        scale = 2.0 * _sigmoid(aff)
        r = rng.random((3, n))
        like = r[0] < np.minimum(1.0, cfg.like_given_click * scale)
        buy = r[1] < np.minimum(1.0, cfg.purchase_given_click * scale)
        dwell = r[2] < cfg.dwell_given_click
        d = rng.exponential(1.0, (3, n))
        like_ts = click_ts + np.maximum(1, d[0] * cfg.like_delay_mean_s * 1000.0).astype(np.int64)
        buy_ts = click_ts + np.maximum(1, d[1] * cfg.purchase_delay_mean_s * 1000.0).astype(np.int64)
        dwell_s = np.round(1.0 + d[2] * cfg.dwell_mean_s, 1)
        dwell_ts = click_ts + (dwell_s * 1000.0).astype(np.int64)
        uids = self._user_ids
        iids = self._item_ids
        out = []
        cols = zip(users.tolist(), items.tolist(), imp_ids, click_ts.tolist(), like.tolist(),
                   like_ts.tolist(), buy.tolist(), buy_ts.tolist(), dwell.tolist(),
                   dwell_ts.tolist(), dwell_s.tolist(), strict=True)
        for u, it, imp, cts, lk, lts, by, bts, dw, dts, dsec in cols:
            uid = uids[u]
            iid = iids[it]
            out.append({"type": "feedback", "ts": cts, "user_id": uid, "item_id": iid,
                        "action": "click", "impression_id": imp, "value": 1.0})
            if lk:
                out.append({"type": "feedback", "ts": lts, "user_id": uid, "item_id": iid,
                            "action": "like", "impression_id": imp, "value": 1.0})
            if by:
                out.append({"type": "feedback", "ts": bts, "user_id": uid, "item_id": iid,
                            "action": "purchase", "impression_id": imp, "value": 1.0})
            if dw:
                out.append({"type": "feedback", "ts": dts, "user_id": uid, "item_id": iid,
                            "action": "dwell", "impression_id": imp, "value": dsec})
        return out

    def _organic(self, rows: np.ndarray, ts: np.ndarray,
                 U: np.ndarray) -> dict[int, tuple[int, dict[str, Any]]]:
        """Organic interactions (no impression) at request rows ``rows`` (times ``ts``):
        an activity-weighted user picks the best of 20 random available items.
        Returns {row: (user index, feedback event)}."""
        cfg = self.config
        rng = self._rng
        n = len(ts)
        users = np.searchsorted(self._user_cdf, rng.random(n))
        avail = self._avail_idx
        cand = avail[rng.integers(0, len(avail), size=(n, 20))]
        aff = self._affinity(U, users, cand)
        best = np.argmax(aff, axis=1)
        items = cand[np.arange(n), best]
        a = aff[np.arange(n), best]
        rating = np.clip(np.rint(2.0 + a + rng.normal(0.0, 0.7, n)), 1, 5)
        is_rating = rng.random(n) < cfg.organic_rating_share
        out: dict[int, tuple[int, dict[str, Any]]] = {}
        for j, t, u, it, rt, isr in zip(rows.tolist(), ts.tolist(), users.tolist(), items.tolist(),
                                        rating.tolist(), is_rating.tolist(), strict=True):
            if isr:
                ev = {"type": "feedback", "ts": t, "user_id": self._user_ids[u],
                      "item_id": self._item_ids[it], "action": "rating", "value": rt}
            else:
                ev = {"type": "feedback", "ts": t, "user_id": self._user_ids[u],
                      "item_id": self._item_ids[it], "action": "click", "value": 1.0,
                      "context": {"source": "search"}}
            out[j] = (u, ev)
        return out

    def _flush(self, new: list[dict[str, Any]]) -> None:
        """Move events with ts <= the clock to the output, the rest to the heap."""
        cutoff = int(self._t)
        heap = self._heap
        ready: list[dict[str, Any]] = []
        while heap and heap[0][0] <= cutoff:
            ready.append(heapq.heappop(heap)[2])
        for ev in new:
            if ev["ts"] <= cutoff:
                ready.append(ev)
            else:
                heapq.heappush(heap, (ev["ts"], self._seq, ev))
                self._seq += 1
        ready.sort(key=_TS)
        self._out.extend(ready)

    # ------------------------------------------------------------ public

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` next events in ts order; ``[]`` when a finite stream is done."""
        if self.max_events is not None:
            n = min(n, self.max_events - self._emitted)
        if n <= 0:
            return []
        out = self._out
        while len(out) < n:
            self._step()
        if n == len(out):
            batch = list(out)
            out.clear()
        else:
            batch = [out.popleft() for _ in range(n)]
        self._emitted += n
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Events one at a time (state advances per yielded event, so snapshots are exact)."""
        out = self._out
        while self.max_events is None or self._emitted < self.max_events:
            while not out:
                self._step()
            self._emitted += 1
            yield out.popleft()

    def advance(self, ts_ms: int) -> list[dict[str, Any]]:
        """Move the world's clock to ``ts_ms`` without generating requests: every scheduled
        change due by then is applied in time order (gradual taste drift every
        ``drift_step_s``, items added and retired), with the simulator's own RNG, so it is
        deterministic for a seed and a sequence of calls. Returns the ``item`` events of
        the catalogue changes (ts <= ``ts_ms``), for a closed loop to pass on; the logged
        stream (``next_batch``) must not be used after this (its requests would be
        older than the changes)."""
        new: list[dict[str, Any]] = []
        while True:
            t_change = min(self._next_add, self._next_retire, self._next_drift)
            if t_change > ts_ms:
                break
            self._t = max(self._t, t_change)
            self._apply_change(t_change, new)
        self._t = max(self._t, float(ts_ms))
        return new

    @property
    def emitted(self) -> int:
        """Number of events emitted so far."""
        return self._emitted

    @property
    def now_ms(self) -> int:
        """The simulator's clock (event time of the latest generated step), epoch ms."""
        return int(self._t)

    def snapshot(self) -> dict[str, Any]:
        """A picklable, independent copy of the full state (no history is kept).

        Size is O(n_users * dim + items * dim + pending events); pending events are
        the generated-but-not-emitted ones (at most one block plus delayed feedback).
        """
        skip = {"config", "_user_ids", "_item_ids", "_rng", "_resp_rng",
                "_avail_idx", "_pop_cdf", "_out"}
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state["_out"] = list(self._out)
        state["_rng"] = self._rng.bit_generator.state
        state["_resp_rng"] = self._resp_rng.bit_generator.state
        state["config"] = asdict(self.config)
        state["version"] = _SNAPSHOT_VERSION
        return copy.deepcopy(state)

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Simulator:
        """A simulator that continues exactly where ``state`` was taken."""
        state = copy.deepcopy(state)
        if state.pop("version", None) != _SNAPSHOT_VERSION:
            raise ValueError("unsupported simulator snapshot version")
        sim = cls.__new__(cls)
        sim.config = SimConfig(**state.pop("config"))
        rng_state = state.pop("_rng")
        resp_state = state.pop("_resp_rng")
        out = state.pop("_out")
        sim.__dict__.update(state)
        sim._rng = np.random.default_rng()
        sim._rng.bit_generator.state = rng_state
        sim._resp_rng = np.random.default_rng()
        sim._resp_rng.bit_generator.state = resp_state
        sim._out = deque(out)
        sim._policy_dirty = True
        sim._init_strings()
        return sim

    # ------------------------------------------------------- hidden truth

    def _user_index(self, user_id: str) -> int:
        try:
            u = int(user_id[1:]) if user_id[:1] == "u" else -1
        except ValueError:
            u = -1
        if not 0 <= u < self.config.n_users or self._user_ids[u] != user_id:
            raise KeyError(f"unknown user {user_id!r}")
        return u

    def _item_index(self, item_id: str) -> int:
        try:
            i = int(item_id[1:]) if item_id[:1] == "i" else -1
        except ValueError:
            i = -1
        if not 0 <= i < self._n_items or self._item_ids[i] != item_id:
            raise KeyError(f"unknown item {item_id!r}")
        return i

    def draw_users(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` user IDs drawn by activity (the simulator's Zipf weights) with ``rng``
        (the caller's generator: the simulator's own stream is not touched)."""
        return [self._user_ids[u] for u in np.searchsorted(self._user_cdf, rng.random(n)).tolist()]

    def views(self, user_id: str, ts_ms: int, n: int, rng: np.random.Generator,
              candidates: int = 20) -> list[dict[str, Any]]:
        """``n`` organic ``view`` events (feedback without impression_id) of ``user_id`` at
        ``ts_ms``: each the best of ``candidates`` random available items by the user's
        true affinity (tastes as of ``ts_ms``, like :meth:`click_probability`), so views
        reveal taste. Uses the caller's ``rng``: the simulator's own stream is untouched."""
        if n <= 0:
            return []
        if self._policy_dirty:
            self._refresh_policy()
        u = self._user_index(user_id)
        avail = self._avail_idx
        cand = avail[rng.integers(0, len(avail), size=(n, candidates))]
        aff = self._affinity(self._tastes_at(ts_ms), np.full(n, u), cand)
        items = cand[np.arange(n), np.argmax(aff, axis=1)].tolist()
        return [{"type": "feedback", "ts": int(ts_ms), "user_id": user_id,
                 "item_id": self._item_ids[i], "action": "view", "value": 1.0} for i in items]

    def click_probability(self, user_id: str, item_id: str, position: int, ts_ms: int) -> float:
        """True P(click) of ``item_id`` shown to ``user_id`` at ``position`` (0-based).

        Uses the tastes as of the simulator's clock (gradual drift is not
        extrapolated); ``ts_ms`` selects the regime before / after ``drift_at``.
        """
        u = self._user_index(user_id)
        i = self._item_index(item_id)
        U = self._tastes_at(ts_ms)
        aff = self.config.affinity_scale * float(np.dot(U[u], self._V[i]))
        pos = -self.config.position_bias_eta * math.log1p(max(0, position))
        x = self._b0 + aff + float(self._item_bias(i)) + pos
        return 1.0 / (1.0 + math.exp(-x))

    def slot_truth(self, user_id: str, item_id: str, ts_ms: int) -> tuple[int, float]:
        """Hidden truth for evaluation, what an item's true click probability is made of:
        (the rank of the item's category among the user's categories by taste as of
        ``ts_ms``, 0 = the one they like most; the item's own log-odds bias)."""
        u = self._user_index(user_id)
        i = self._item_index(item_id)
        by_category = self._centroids @ self._tastes_at(ts_ms)[u]
        rank = int((by_category > by_category[int(self._item_cat[i])]).sum())
        return rank, float(self._item_bias(i))

    def shifted(self, user_id: str) -> bool:
        """Hidden truth for evaluation: whether ``drift_at`` gives the user a new taste."""
        u = self._user_index(user_id)
        return self._U_shift is not None and not np.array_equal(self._U_shift[u], self._U[u])

    def top_items(self, user_id: str, k: int, ts_ms: int) -> list[str]:
        """The oracle's list: the ``k`` available items of highest true click probability
        for ``user_id`` (tastes as of ``ts_ms``), best first (position bias is the same
        for every item, so this order is also the best order by position)."""
        if self._policy_dirty:
            self._refresh_policy()
        u = self._user_index(user_id)
        avail = self._avail_idx
        logit = (self.config.affinity_scale * (self._V[avail] @ self._tastes_at(ts_ms)[u])
                 + self._item_bias(avail))
        top = np.argsort(-logit, kind="stable")[:k]
        return [self._item_ids[int(i)] for i in avail[top]]

    def respond(self, user_id: str, item_ids: list[str], ts_ms: int,
                request_id: str) -> list[dict[str, Any]]:
        """Impressions (at ``ts_ms``, positions 0..) and the hidden users' feedback.

        For closed-loop demos: the system's served list is shown to the simulated
        user. Uses a separate RNG and impression counter (IDs ``imp{seed}-c{n}``), so
        it never changes the simulator's own stream. Feedback lies in the future
        (ts > ts_ms); the returned list is sorted by ts. Unknown IDs raise KeyError.
        """
        cfg = self.config
        u = self._user_index(user_id)
        items = np.array([self._item_index(i) for i in item_ids], dtype=np.int64)
        n = len(items)
        if n == 0:
            return []
        uid = self._user_ids[u]
        U = self._tastes_at(ts_ms)
        aff = cfg.affinity_scale * (self._V[items] @ U[u])
        pos = -cfg.position_bias_eta * np.log1p(np.arange(n))
        p = _sigmoid(self._b0 + aff + self._item_bias(items) + pos)
        clicks = self._resp_rng.random(n) < p
        base = self._n_resp_impressions
        self._n_resp_impressions += n
        imp_ids = [f"{self._resp_prefix}{base + j}" for j in range(n)]
        events: list[dict[str, Any]] = [
            {"type": "impression", "ts": int(ts_ms), "impression_id": imp_ids[j],
             "user_id": uid, "item_id": self._item_ids[int(items[j])], "request_id": request_id,
             "position": j, "context": {}}
            for j in range(n)]
        idx = np.flatnonzero(clicks)
        if len(idx):
            events.extend(self._feedback_events(
                np.full(len(idx), u), items[idx], aff[idx],
                np.full(len(idx), int(ts_ms), dtype=np.int64),
                [imp_ids[j] for j in idx.tolist()], self._resp_rng))
        events.sort(key=_TS)
        return events


def write_log(path: str | os.PathLike[str], n: int, seed: int,
              config: SimConfig | None = None,
              on_batch: Callable[[int], None] | None = None) -> int:
    """Write ``n`` simulated events as JSONL (gzip if ``path`` ends with ``.gz``).

    ``on_batch(count)`` is called after each written batch (progress). Returns the
    number of events written.
    """
    sim = Simulator(config, seed=seed, max_events=n)
    dumps = orjson.dumps
    written = 0
    with open_log_for_write(path) as fh:
        while True:
            batch = sim.next_batch(10_000)
            if not batch:
                break
            fh.write(b"\n".join(dumps(ev) for ev in batch) + b"\n")
            written += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
    return written


def _main(argv: list[str] | None = None) -> None:
    """Benchmark / writer: ``python -m events.simulator -n 1000000 [--seed S] [-o LOG]``."""
    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    c0 = time.process_time()
    if args.output:
        count = write_log(args.output, args.n, args.seed)
    else:
        sim = Simulator(seed=args.seed, max_events=args.n)
        count = 0
        while batch := sim.next_batch(10_000):
            count += len(batch)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(orjson.dumps({"events": count, "seconds": round(dt, 3),
                        "events_per_s": round(count / dt),
                        "cpu_events_per_s": round(count / cpu)}).decode())


if __name__ == "__main__":
    _main()
