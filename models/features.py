"""The ranker's feature function, shared verbatim by training and serving.

``ranking_features`` turns one (user, item, time, context, position, extra) tuple into
a River-style sparse dict ``{name: float}``. Naming:

* ids: ``user=<user_id>``, ``item=<item_id>`` (1.0);
* event time (UTC): ``hour=<0..23>``, ``dow=<0..6>`` (Monday = 0) (1.0);
* position: ``pos=<p>`` (1.0); ``-1`` = unknown (organic interactions);
* context (request/impression ``context``): string ``v`` -> ``ctx.<key>=<v>`` (1.0),
  number -> ``ctx.<key>`` (numeric, see below);
* ``extra`` (an example's ``features``: attributes such as ``u:age_bucket``, profile
  aggregates such as ``user.clicks.1h``, later model scores): string ``v`` ->
  ``<key>=<v>`` (1.0), number -> ``<key>`` (numeric), list/tuple of strings -> one
  ``<key>=<s>`` per element (multi-hot); ``None``, NaN and infinities are left out.

Numbers go through the fixed signed log ``sign(v) * ln(1 + |v|)`` (booleans become
0/1) so counts and prices of any scale feed SGD/Adagrad without a stateful scaler,
identically at training and serving time.

**Serving position convention.** A training example carries the position it was shown
at; at serving time the position is not known yet, so every candidate is scored with
``position = SERVING_POSITION`` (0): the score is "P(positive if shown first)". The
position feature then only shifts every candidate by the same term in LR (ranking
unchanged), and the calibrated probability refers to the top slot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SERVING_POSITION = 0
"""Position passed by the serving path for every candidate (see module docstring)."""

_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000
_EPOCH_DOW = 3  # 1970-01-01 was a Thursday (Monday = 0)

# Interned names of the time and position features (avoid formatting per call).
_HOUR = [f"hour={h}" for h in range(24)]
_DOW = [f"dow={d}" for d in range(7)]
_POS = {p: f"pos={p}" for p in range(-1, 64)}

Features = dict[str, float]

_isfinite = math.isfinite
_log1p = math.log1p


def signed_log(v: float) -> float:
    """``sign(v) * ln(1 + |v|)``: the fixed transform of every numeric feature."""
    return math.log1p(v) if v >= 0.0 else -math.log1p(-v)


def add_feature(out: Features, name: str, value: Any) -> None:
    """Add one raw value under ``name`` (categorical, numeric or multi-hot)."""
    kind = type(value)
    if kind is float:  # fast paths of the two common exact types (same results as below)
        if value == 0.0:  # log1p(+-0.0) is that zero (math.log1p returns it as it is)
            out[name] = value
        elif _isfinite(value):
            out[name] = _log1p(value) if value >= 0.0 else -_log1p(-value)
        return
    if kind is str:
        out[f"{name}={value}"] = 1.0
        return
    if kind is int:  # finite once a float (float() raises for the too large, as below)
        v = float(value)
        out[name] = _log1p(v) if v >= 0.0 else -_log1p(-v)
        return
    if isinstance(value, list | tuple):  # multi-hot (no list or tuple is also a str or number)
        for s in value:
            if type(s) is str or isinstance(s, str | int) and not isinstance(s, bool):
                out[f"{name}={s}"] = 1.0
    elif isinstance(value, str):
        out[f"{name}={value}"] = 1.0
    elif isinstance(value, bool):
        out[name] = 1.0 if value else 0.0
    elif isinstance(value, int | float):
        v = float(value)
        if math.isfinite(v):
            out[name] = signed_log(v)
    # None, dicts and other types carry no feature


def ranking_features(
    user_id: str,
    item_id: str,
    ts_ms: int,
    context: Mapping[str, Any] | None = None,
    position: int | None = -1,
    extra: Mapping[str, Any] | None = None,
) -> Features:
    """Sparse features of showing ``item_id`` to ``user_id`` at event time ``ts_ms``.

    ``ts_ms`` is epoch milliseconds (UTC hour and weekday are derived from it);
    ``position`` is the 0-based slot (-1 unknown; serving passes ``SERVING_POSITION``).
    Values are floats; categoricals are one-hot (``name=value: 1.0``).
    """
    out: Features = {
        f"user={user_id}": 1.0,
        f"item={item_id}": 1.0,
        _HOUR[(ts_ms // _MS_PER_HOUR) % 24]: 1.0,
        _DOW[(ts_ms // _MS_PER_DAY + _EPOCH_DOW) % 7]: 1.0,
    }
    pos_name = _POS.get(-1 if position is None else position)
    out[pos_name if pos_name is not None else f"pos={position}"] = 1.0
    if context:
        for key, value in context.items():
            add_feature(out, f"ctx.{key}", value)
    if extra:
        for key, value in extra.items():
            if type(value) is float and value == 0.0:
                out[key] = value  # add_feature's commonest case (a zero count), without the call
            elif value is not None:  # add_feature makes nothing of None
                add_feature(out, key, value)
    return out


def ranking_features_many(
    user_id: str,
    item_ids: list[str],
    ts_ms: int,
    context: Mapping[str, Any] | None,
    position: int | None,
    user_extra: Mapping[str, Any] | None,
    item_extras: list[Mapping[str, Any]],
) -> list[Features]:
    """``ranking_features`` of one user and many items, sharing the per-user work.

    Equal to ``ranking_features(user_id, item, ts_ms, context, position,
    {**user_extra, **item_extra})`` for each item (item keys win on a clash), but the
    user, time, context and ``user_extra`` part is transformed once per call.
    """
    shared = shared_features(user_id, ts_ms, context, position, user_extra)
    return [join_features(shared, user_extra, item, extra)
            for item, extra in zip(item_ids, item_extras, strict=True)]


def shared_features(
    user_id: str,
    ts_ms: int,
    context: Mapping[str, Any] | None,
    position: int | None,
    user_extra: Mapping[str, Any] | None,
) -> Features:
    """The item-independent part of ``ranking_features_many`` (user, time, position,
    context, ``user_extra``), in the order its dicts hold it."""
    shared = ranking_features(user_id, "", ts_ms, context, position, user_extra)
    del shared["item="]
    return shared


def join_features(shared: Features, user_extra: Mapping[str, Any] | None, item_id: str,
                  extra: Mapping[str, Any]) -> Features:
    """One item's dict of ``ranking_features_many`` from its ``shared_features``."""
    feats = dict(shared)
    feats[f"item={item_id}"] = 1.0
    for key, value in extra.items():
        if user_extra is not None and key in user_extra:
            _drop(feats, key, user_extra[key])
        add_feature(feats, key, value)
    return feats


def item_part(shared: Features, user_extra: Mapping[str, Any] | None, item_id: str,
              extra: Mapping[str, Any]) -> Features | None:
    """The item's own features such that ``join_features(shared, user_extra, item_id,
    extra) == {**shared, **part}`` *in the same key order* (the part's keys are new and
    come after the shared ones), or None when that does not hold (an ``extra`` key
    overrides a ``user_extra`` key, or an item feature name is also a shared one).

    Lets a linear scorer sum the shared part once per request and only the part per
    item, adding the terms in exactly the order a dot product over the full dict would.
    """
    part: Features = {f"item={item_id}": 1.0}
    clash = user_extra is not None and len(user_extra) > 0
    for key, value in extra.items():
        if clash and key in user_extra:  # type: ignore[operator]
            return None
        kind = type(value)  # add_feature, with its commonest cases (float, str, int) inlined
        if kind is float:
            if _isfinite(value):
                part[key] = _log1p(value) if value >= 0.0 else -_log1p(-value)
        elif kind is str:
            part[f"{key}={value}"] = 1.0
        elif kind is int:
            v = float(value)
            part[key] = _log1p(v) if v >= 0.0 else -_log1p(-v)
        else:
            add_feature(part, key, value)
    for name in part:
        if name in shared:
            return None
    return part


def compact(features: Mapping[str, Any]) -> dict[str, Any]:
    """``features`` without the values that add no term to a linear model: None, NaN,
    infinities, numeric zeros (and False), empty lists, dicts (``_add`` turns them into
    nothing or into ``name: 0.0``). Strings stay (``""`` is the category ``name=``).

    For the default ranker (River LR with AdaGrad) training on the compact dict is
    exact: a term ``w * 0.0`` adds nothing to the score and a zero gradient leaves the
    weight and its AdaGrad state as they were. (FM-style rankers no longer draw a latent
    vector for a feature that was only ever zero.)"""
    out = {}
    for name, value in features.items():
        kind = type(value)
        if kind is float:
            if value != 0.0 and _isfinite(value):
                out[name] = value
        elif kind is str:
            out[name] = value
        elif value is None or kind is dict:
            continue
        elif kind is list or kind is tuple:
            if value:
                out[name] = value
        elif isinstance(value, int | float):  # bool and int included
            if value and _isfinite(value):
                out[name] = value
        else:
            out[name] = value
    return out


def _drop(feats: Features, name: str, value: Any) -> None:
    """Remove what ``add_feature(feats, name, value)`` added (for overridden user keys)."""
    if isinstance(value, str):
        feats.pop(f"{name}={value}", None)
    elif isinstance(value, list | tuple):
        for s in value:
            feats.pop(f"{name}={s}", None)
    else:
        feats.pop(name, None)


def example_features(example: Mapping[str, Any]) -> Features:
    """``ranking_features`` of a training example (the joiner's record)."""
    return ranking_features(
        example["user_id"],
        example["item_id"],
        example["ts"],
        example.get("context"),
        example.get("position", -1),
        example.get("features"),
    )


def serving_features(
    user_id: str,
    item_id: str,
    ts_ms: int,
    context: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Features:
    """``ranking_features`` of a (request, candidate) pair at serving time (position 0)."""
    return ranking_features(user_id, item_id, ts_ms, context, SERVING_POSITION, extra)
