"""A per-user detector of a moved taste: CUSUM of how much better the shard-wide click
rates explain the user's newest outcomes than the user's own posterior does.

Each outcome of a user (an exposure of ``w`` position-discounted impressions of a
category, or a click on it) adds the log-likelihood ratio of the shard-wide rate
``r_s`` against the user's posterior mean ``r_u`` of that category, clicks Poisson per
exposure: ``w (r_u - r_s)`` for an exposure, ``ln(r_s / r_u)`` for a click. While the
taste holds, the user's posterior explains the clicks better and the sum drifts down
(it is kept >= 0); when the clicks stop following it (the old favourite shown without
clicks, clicks where the user was believed cold) it climbs, and past a threshold the
user's counts are faded (``models.category_bandit``: ``change_threshold``,
``change_fade``). Users whose posteriors are still near the shard's barely move it.

No Bytewax here.
"""

from __future__ import annotations

import math


def exposure_surprise(weight: float, user_rate: float, shard_rate: float) -> float:
    """Log-likelihood ratio (shard over user) of ``weight`` exposures without a click."""
    return weight * (user_rate - shard_rate)


def click_surprise(user_rate: float, shard_rate: float, weight: float = 1.0) -> float:
    """Log-likelihood ratio (shard over user) of ``weight`` clicks."""
    return weight * math.log(shard_rate / user_rate)


def cusum(total: float, step: float, threshold: float) -> tuple[float, bool]:
    """The CUSUM after ``step`` (kept >= 0) and whether it passed ``threshold`` (then 0)."""
    total = max(total + step, 0.0)
    if total > threshold:
        return 0.0, True
    return total, False
