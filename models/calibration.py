"""Calibration: undoing negative downsampling, and measuring how calibrated scores are.

**Correction** (He et al. 2014, "Practical lessons from predicting clicks on ads at
Facebook"): a model trained *unweighted* on a stream whose negatives were kept with
probability ``r`` overestimates the odds by ``1/r``; the calibrated probability is

    q = p / (p + (1 - p) / r)

(equivalently ``logit(q) = logit(p) + ln r``). With ``r = 1`` it is the identity.

**Training weights that match it.** An example's ``weight`` is the number of real
examples it stands for (``1/r`` for a kept downsampled negative, 1 for positives and
for negatives that were never downsampled, e.g. popularity-sampled ones).
``train_weight`` maps it to the weight in the thinned stream the correction assumes:
``weight * r`` for negatives, ``weight`` for positives, so a kept negative trains
with weight 1 and a never-downsampled negative with ``r``.

**Measuring.** ``calibration_ratio`` = weighted mean prediction / weighted observed
positive rate (1 = calibrated; weights are the examples' ``weight``, so a downsampled
stream is compared with the true positive rate). ``reliability_curve``: predictions
sorted and cut into groups of equal weight; per group the mean prediction and the
observed rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def correct_downsampled(p: float, rate: float) -> float:
    """Calibrated probability of a raw prediction ``p`` from a model trained on negatives
    kept at ``rate`` (0 < rate <= 1): ``p / (p + (1 - p) / rate)``."""
    if rate >= 1.0:
        return p
    denom = p + (1.0 - p) / rate
    return p / denom if denom > 0.0 else 0.0


def correct_downsampled_many(p: np.ndarray, rate: float) -> np.ndarray:
    """Vectorized :func:`correct_downsampled` (float64 array in, same shape out)."""
    p = np.asarray(p, np.float64)
    if rate >= 1.0:
        return p
    return p / (p + (1.0 - p) / rate)


def train_weight(label: int, weight: float, rate: float) -> float:
    """Training weight in the thinned stream: ``weight * rate`` for negatives, ``weight``
    for positives (a kept downsampled negative, weight ``1/rate``, trains with 1)."""
    return weight if label else weight * rate


def rate_from_example(example: Mapping[str, Any]) -> float | None:
    """Keep rate ``r`` implied by a kept downsampled negative (``weight = 1/r > 1``), else None."""
    if example.get("label"):
        return None
    w = float(example.get("weight", 1.0))
    return 1.0 / w if w > 1.0 else None


def calibration_ratio(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
                      w: Sequence[float] | np.ndarray | None = None) -> float:
    """``sum(w * p) / sum(w * y)``: mean prediction over observed positive rate (nan if no
    positives)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    w = np.ones_like(p) if w is None else np.asarray(w, np.float64)
    pos = float((w * y).sum())
    return float((w * p).sum()) / pos if pos > 0 else float("nan")


def equal_weight_groups(w: np.ndarray, wp: np.ndarray, wy: np.ndarray,
                        n_groups: int, n: np.ndarray | None = None) -> list[dict[str, float]]:
    """Merge consecutive cells (sorted by prediction) into ``n_groups`` of ~equal weight.

    ``w``, ``wp``, ``wy``: per cell total weight, weighted sum of predictions and of
    labels; ``n`` (optional): examples per cell. Returns per non-empty group
    ``{"p_mean", "y_rate", "weight"}`` (and ``"count"`` with ``n``).
    """
    total = float(w.sum())
    if total <= 0:
        return []
    cum = np.cumsum(w)
    group = np.minimum((cum - w / 2) * n_groups // total, n_groups - 1).astype(np.int64)
    gw = np.bincount(group, w, n_groups)
    gp = np.bincount(group, wp, n_groups)
    gy = np.bincount(group, wy, n_groups)
    gn = np.bincount(group, n, n_groups) if n is not None else None
    return [{"p_mean": float(gp[g] / gw[g]), "y_rate": float(gy[g] / gw[g]), "weight": float(gw[g]),
             **({"count": int(gn[g])} if gn is not None else {})}
            for g in range(n_groups) if gw[g] > 0]


def reliability_curve(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray,
                      w: Sequence[float] | np.ndarray | None = None,
                      bins: int = 10) -> list[dict[str, float]]:
    """Reliability curve: predictions sorted, cut into ``bins`` groups of equal weight;
    per group the weighted mean prediction ``p_mean``, observed rate ``y_rate`` and
    ``weight``. A calibrated model has ``p_mean ~= y_rate`` in every group."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    w = np.ones_like(p) if w is None else np.asarray(w, np.float64)
    order = np.argsort(p, kind="stable")
    y, p, w = y[order], p[order], w[order]
    return equal_weight_groups(w, w * p, w * y, bins)
