"""Declarative feature specs for the profile store (config, not code).

A feature is one table of config, e.g. from TOML ``[[features]]``::

    name = "clicks"                      # [a-z][a-z0-9_]*, unique per entity
    entity = "user"                      # user | item | user_x_<item attr>
    filter = { type = "feedback", action = ["click", "like"] }   # action: str or list
    aggregate = "count"                  # see AGGREGATES
    windows = ["5m", "1h", "1d", "7d"]   # durations or "all" (default ["all"])

Optional keys: ``value`` (event field to aggregate, dotted path, or a number),
``k`` (last_k length / distinct_count sketch size), ``half_life`` (decay_sum),
``default`` (output when a window is empty), ``filter.min_value``, ``transform``
(a function of a numeric value before it is aggregated: ``TRANSFORMS``).

A ``rate`` is derived at query time from two stored features of the same entity and
window, not stored: ``of = ["clicks", "impressions"]`` gives ``100 * clicks /
(impressions + prior)`` (events per 100 of the denominator, e.g. a CTR in percent,
shrunk toward 0 by ``prior`` pseudo-observations, default 10), e.g. ::

    {name = "ctr", entity = "user_x_category", aggregate = "rate",
     of = ["clicks", "impressions"], windows = ["1h", "1d", "7d"]}

Every feature yields one output per window, named ``<entity>.<name>.<window>``
(``user.clicks.1h``, ``user_x_category.clicks.7d``, ``user.click_decay.all``).
Durations are parsed to integer milliseconds. The shipped default set is
``DEFAULT_FEATURES`` (raw config) / ``default_features()`` (parsed).
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGGREGATES: tuple[str, ...] = (
    "count", "sum", "mean", "min", "max", "last", "decay_sum", "distinct_count", "last_k",
    "rate",
)
EVENT_TYPES: tuple[str, ...] = ("impression", "feedback", "request", "item", "user")
# Which id fields each event type carries (docs/events.md).
_HAS_USER = frozenset({"impression", "feedback", "request", "user"})
_HAS_ITEM = frozenset({"impression", "feedback", "item"})

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION_RE = re.compile(r"^([0-9]+)(ms|s|m|h|d|w)$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ENTITY_RE = re.compile(r"^(user|item|user_x_[a-z][a-z0-9_]*)$")
_KEYS = frozenset({"name", "entity", "filter", "aggregate", "value", "windows", "k",
                   "half_life", "default", "of", "prior", "transform"})
def position_discount(position: float) -> float:
    """The DCG discount ``1 / log2(2 + p)`` of a 0-based position (1.0 when unknown, < 0)."""
    return 1.0 / math.log2(2.0 + position) if position >= 0 else 1.0


TRANSFORMS: dict[str, Callable[[float], float]] = {"position_discount": position_discount}
"""``transform``: a function applied to a numeric value before it is aggregated.
``position_discount`` turns a 0-based ``position`` into the DCG discount ``1 / log2(2 +
p)`` (1.0 at the top slot, 0.29 at the tenth; unknown -1 counts 1.0): summed over
impressions it is their exposure, the denominator of a position-corrected rate (clicks
over expected clicks, COEC)."""
_FILTER_KEYS = frozenset({"type", "action", "min_value"})
_VALUE_AGGS = frozenset({"sum", "mean", "min", "max", "last", "decay_sum"})
_NUMERIC_AGGS = frozenset({"sum", "mean", "min", "max", "decay_sum"})

#: Default ``k``: last_k list length, distinct_count sketch size (exact below k).
DEFAULT_LAST_K = 20
DEFAULT_DISTINCT_K = 64
#: ``rate``: pseudo-observations of the denominator with none of the numerator (shrinks
#: rates of few observations toward 0), and the unit (events per 100 of the denominator).
DEFAULT_RATE_PRIOR = 10.0
RATE_SCALE = 100.0
#: Aggregates a ``rate`` may divide (additive counts or sums of one window).
RATE_PARTS = frozenset({"count", "sum", "decay_sum", "distinct_count"})
#: Largest accepted finite window (ms): one year.
MAX_WINDOW_MS = 366 * 86_400_000

MISSING: Any = object()  # returned by FeatureSpec.extract when the value field is absent


class FeatureSpecError(ValueError):
    """A feature spec is invalid; the message names the feature and the offending key."""


def parse_duration(text: str | int, where: str = "duration") -> int:
    """Parse ``"30s" | "5m" | "1h" | "1d" | "7d" | "250ms" | "2w"`` (or int ms) to ms > 0."""
    if isinstance(text, bool):
        raise FeatureSpecError(f"{where}: {text!r} is not a duration")
    if isinstance(text, int):
        ms = text
    elif isinstance(text, str) and (m := _DURATION_RE.match(text.strip().lower())):
        ms = int(m.group(1)) * _UNITS_MS[m.group(2)]
    else:
        raise FeatureSpecError(
            f"{where}: {text!r} is not a duration (use e.g. 30s, 5m, 1h, 1d, 7d, 30d)")
    if ms <= 0:
        raise FeatureSpecError(f"{where}: {text!r} must be > 0")
    return ms


def _field_getter(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """Getter for a (dotted) event field; ``value`` defaults to 1.0 as in docs/events.md."""
    if path == "value":
        return lambda e: e.get("value", 1.0)
    parts = path.split(".")
    if len(parts) == 1:
        return lambda e: e.get(path, MISSING)

    def get(e: Mapping[str, Any]) -> Any:
        cur: Any = e
        for p in parts:
            if not isinstance(cur, Mapping) or p not in cur:
                return MISSING
            cur = cur[p]
        return cur

    return get


@dataclass(frozen=True, eq=False)
class FeatureSpec:
    """One parsed, validated feature.

    ``windows`` are in ms, ascending, with ``None`` ("all", unbounded) last;
    ``window_labels`` are aligned with them. ``value`` is a field path, a number
    (constant), or ``None`` (count). ``half_life_ms`` only for decay_sum.
    """

    name: str
    entity: str
    event_type: str
    actions: frozenset[str] | None
    min_value: float | None
    aggregate: str
    value: str | float | None
    windows: tuple[int | None, ...]
    window_labels: tuple[str, ...]
    k: int | None
    half_life_ms: int | None
    default: Any
    raw: Mapping[str, Any]
    of: tuple[str, str] | None = None
    """``rate``: the names of its numerator and denominator features (same entity)."""
    prior: float = 0.0
    """``rate``: pseudo-observations added to the denominator."""
    transform: str | None = None
    """A ``TRANSFORMS`` name applied to the value before aggregation, or None."""

    @property
    def derived(self) -> bool:
        """True for a ``rate``: computed at query time from other outputs, not stored."""
        return self.of is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        """``<entity>.<name>.<window label>`` for each window, in ``windows`` order."""
        return tuple(f"{self.entity}.{self.name}.{lab}" for lab in self.window_labels)

    @property
    def longest_window_ms(self) -> int:
        """Longest finite window in ms (0 if the feature only has ``all``)."""
        return max((w for w in self.windows if w is not None), default=0)

    @property
    def has_all(self) -> bool:
        """True if one window is ``all`` (unbounded)."""
        return self.windows[-1] is None

    @property
    def cross_attr(self) -> str | None:
        """Item attribute of a ``user_x_<attr>`` entity, else None."""
        return self.entity[7:] if self.entity.startswith("user_x_") else None

    def matches(self, event: Mapping[str, Any]) -> bool:
        """Event filter: type, action set, min_value (on the ``value`` field, default 1.0)."""
        if self.derived or event.get("type") != self.event_type:
            return False
        if self.actions is not None and event.get("action") not in self.actions:
            return False
        if self.min_value is not None:
            v = event.get("value", 1.0)
            if not isinstance(v, (int, float)) or v < self.min_value:
                return False
        return True

    def value_getter(self) -> Callable[[Mapping[str, Any]], Any]:
        """Function event -> raw value to aggregate (``MISSING`` when the field is absent)."""
        v = self.value
        if v is None:
            return lambda e: 1
        if isinstance(v, str):
            return _field_getter(v)
        return lambda e: v

    def extract(self, event: Mapping[str, Any]) -> Any:
        """Raw value of this feature for ``event`` (``MISSING`` when the field is absent)."""
        return self.value_getter()(event)

    def to_dict(self) -> dict[str, Any]:
        """The raw config this spec was parsed from (round-trips through parse_feature)."""
        return dict(self.raw)


def _err(where: str, key: str, msg: str) -> FeatureSpecError:
    return FeatureSpecError(f"{where}: key '{key}': {msg}")


def _parse_windows(raw: Mapping[str, Any], where: str) -> list[tuple[int | None, str]]:
    """(ms or None for "all", label) of a spec's ``windows``, ascending, "all" last."""
    wins_raw = raw.get("windows", ["all"])
    if isinstance(wins_raw, str) or not isinstance(wins_raw, (list, tuple)) or not wins_raw:
        raise _err(where, "windows", f"{wins_raw!r} must be a non-empty list like [\"1h\", \"1d\"]")
    pairs: list[tuple[int | None, str]] = []
    seen: dict[int | None, str] = {}
    for w in wins_raw:
        if w == "all":
            ms: int | None = None
            label = "all"
        else:
            ms = parse_duration(w, f"{where}: key 'windows'")
            if ms > MAX_WINDOW_MS:
                raise _err(where, "windows", f"{w!r} is longer than one year")
            label = w.strip().lower() if isinstance(w, str) else f"{w}ms"
        if ms in seen:
            raise _err(where, "windows", f"{w!r} duplicates {seen[ms]!r}")
        seen[ms] = label
        pairs.append((ms, label))
    pairs.sort(key=lambda p: (p[0] is None, p[0] or 0))
    return pairs


def _parse_rate(raw: Mapping[str, Any], where: str, name: str, entity: str) -> FeatureSpec:
    """A ``rate`` spec: ``of`` names two features of the entity (checked by
    ``parse_features``, which sees them all), ``prior`` >= 0, its windows."""
    for key in ("filter", "value", "k", "half_life", "default", "transform"):
        if key in raw:
            raise _err(where, key, "not used by aggregate 'rate' (it divides two other features)")
    of = raw.get("of")
    if (not isinstance(of, (list, tuple)) or len(of) != 2
            or not all(isinstance(n, str) and _NAME_RE.match(n) for n in of) or of[0] == of[1]):
        raise _err(where, "of", f"{of!r} must be two feature names [numerator, denominator]")
    prior = raw.get("prior", DEFAULT_RATE_PRIOR)
    if (isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior)
            or prior < 0):
        raise _err(where, "prior", f"{prior!r} must be a number >= 0")
    pairs = _parse_windows(raw, where)
    return FeatureSpec(
        name=name, entity=entity, event_type="", actions=None, min_value=None, aggregate="rate",
        value=None, windows=tuple(p[0] for p in pairs), window_labels=tuple(p[1] for p in pairs),
        k=None, half_life_ms=None, default=0.0, raw=dict(raw), of=(of[0], of[1]),
        prior=float(prior))


def parse_feature(raw: Mapping[str, Any], where: str = "feature") -> FeatureSpec:
    """Validate one raw feature table; errors name ``where`` (e.g. ``features[3] 'clicks'``)."""
    if not isinstance(raw, Mapping):
        raise FeatureSpecError(f"{where}: expected a table/dict, got {type(raw).__name__}")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} '{name}'"
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _err(where, unknown[0], f"unknown key (allowed: {', '.join(sorted(_KEYS))})")
    rate = raw.get("aggregate") == "rate"
    for key in ("name", "entity", "aggregate") if rate else ("name", "entity", "filter", "aggregate"):
        if key not in raw:
            raise _err(where, key, "missing (required)")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _err(where, "name", f"{name!r} must match [a-z][a-z0-9_]*")
    entity = raw["entity"]
    if not isinstance(entity, str) or not _ENTITY_RE.match(entity):
        raise _err(where, "entity", f"{entity!r} must be user, item or user_x_<item attr>")
    agg = raw["aggregate"]
    if agg not in AGGREGATES:
        raise _err(where, "aggregate", f"{agg!r} is not one of {', '.join(AGGREGATES)}")
    if agg == "rate":
        return _parse_rate(raw, where, name, entity)
    for key in ("of", "prior"):
        if key in raw:
            raise _err(where, key, f"only used by aggregate 'rate', not {agg}")

    flt = raw["filter"]
    if not isinstance(flt, Mapping):
        raise _err(where, "filter", "must be a table like {type = \"feedback\", action = \"click\"}")
    bad = sorted(set(flt) - _FILTER_KEYS)
    if bad:
        raise _err(where, f"filter.{bad[0]}", f"unknown key (allowed: {', '.join(sorted(_FILTER_KEYS))})")
    etype = flt.get("type")
    if etype not in EVENT_TYPES:
        raise _err(where, "filter.type", f"{etype!r} is not one of {', '.join(EVENT_TYPES)}")
    if entity != "item" and etype not in _HAS_USER:
        raise _err(where, "filter.type", f"{etype!r} events carry no user_id (entity {entity!r})")
    if entity != "user" and etype not in _HAS_ITEM:
        raise _err(where, "filter.type", f"{etype!r} events carry no item_id (entity {entity!r})")
    actions: frozenset[str] | None = None
    if "action" in flt:
        act = flt["action"]
        if etype != "feedback":
            raise _err(where, "filter.action", "only feedback events have an action")
        acts = [act] if isinstance(act, str) else act
        if (not isinstance(acts, (list, tuple)) or not acts
                or not all(isinstance(a, str) and a for a in acts)):
            raise _err(where, "filter.action", f"{act!r} must be a string or a non-empty list of strings")
        actions = frozenset(acts)
    min_value = flt.get("min_value")
    if min_value is not None and (isinstance(min_value, bool) or not isinstance(min_value, (int, float))):
        raise _err(where, "filter.min_value", f"{min_value!r} must be a number")

    # value
    value: str | float | None
    if agg == "count":
        if "value" in raw:
            raise _err(where, "value", "not used by aggregate 'count' (use 'sum' for weighted counts)")
        value = None
    else:
        value = raw.get("value", "value" if agg in _VALUE_AGGS else "item_id")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _err(where, "value", f"{value!r} must be an event field name or a number")
        if isinstance(value, str) and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", value):
            raise _err(where, "value", f"{value!r} is not a field name (dotted paths allowed)")
        if isinstance(value, (int, float)) and (agg in ("distinct_count", "last_k")
                                                 or not math.isfinite(value)):
            raise _err(where, "value", f"a constant {value!r} makes no sense for {agg}")

    pairs = _parse_windows(raw, where)

    # k / half_life / default
    k = raw.get("k")
    if agg in ("last_k", "distinct_count"):
        if k is None:
            k = DEFAULT_LAST_K if agg == "last_k" else DEFAULT_DISTINCT_K
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100_000:
            raise _err(where, "k", f"{k!r} must be an integer in [1, 100000]")
        if agg == "distinct_count" and k < 3:
            raise _err(where, "k", "distinct_count needs k >= 3 (sketch size)")
    elif k is not None:
        raise _err(where, "k", f"only used by last_k and distinct_count, not {agg}")
    half_life: int | None = None
    if agg == "decay_sum":
        if "half_life" not in raw:
            raise _err(where, "half_life", "missing (required by decay_sum, e.g. \"1d\")")
        half_life = parse_duration(raw["half_life"], f"{where}: key 'half_life'")
    elif "half_life" in raw:
        raise _err(where, "half_life", f"only used by decay_sum, not {agg}")
    if agg == "last_k":
        if "default" in raw:
            raise _err(where, "default", "last_k always defaults to an empty list")
        default: Any = []
    else:
        default = raw.get("default", 0.0 if agg in ("count", "sum", "decay_sum", "distinct_count")
                          else None)
        if default is not None and (isinstance(default, bool)
                                    or not isinstance(default, (int, float))):
            raise _err(where, "default", f"{default!r} must be a number or omitted")
    if agg in _NUMERIC_AGGS and isinstance(value, str) and value == "item_id":
        raise _err(where, "value", f"'item_id' is not numeric; {agg} needs a number")
    transform = raw.get("transform")
    if transform is not None:
        if transform not in TRANSFORMS:
            raise _err(where, "transform", f"{transform!r} is not one of {', '.join(TRANSFORMS)}")
        if agg not in _NUMERIC_AGGS or not isinstance(value, str):
            raise _err(where, "transform", f"needs a numeric aggregate of an event field, not {agg}")

    return FeatureSpec(
        name=name, entity=entity, event_type=etype, actions=actions,
        min_value=None if min_value is None else float(min_value), aggregate=agg, value=value,
        windows=tuple(p[0] for p in pairs), window_labels=tuple(p[1] for p in pairs),
        k=k, half_life_ms=half_life, default=default, raw=dict(raw), transform=transform,
    )


def parse_features(raw: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[FeatureSpec]:
    """Parse a list of feature tables (or a mapping with a ``features`` list, as from TOML).

    Raises FeatureSpecError naming ``features[i] '<name>'`` and the key at fault; names
    must be unique per entity.
    """
    if isinstance(raw, Mapping):
        if "features" not in raw:
            raise FeatureSpecError("key 'features': missing (expected [[features]] tables)")
        raw = raw["features"]
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise FeatureSpecError("key 'features': must be a list of feature tables")
    specs: list[FeatureSpec] = []
    names: set[tuple[str, str]] = set()
    for i, r in enumerate(raw):
        spec = parse_feature(r, f"features[{i}]")
        if (spec.entity, spec.name) in names:
            raise FeatureSpecError(
                f"features[{i}] '{spec.name}': key 'name': duplicate name for entity '{spec.entity}'")
        names.add((spec.entity, spec.name))
        specs.append(spec)
    for i, spec in enumerate(specs):
        if spec.of is not None:
            _check_rate(spec, specs, f"features[{i}] '{spec.name}'")
    return specs


def _check_rate(spec: FeatureSpec, specs: list[FeatureSpec], where: str) -> None:
    """A rate's two features exist for its entity, are additive and have its windows."""
    assert spec.of is not None
    by_name = {s.name: s for s in specs if s.entity == spec.entity}
    for part in spec.of:
        other = by_name.get(part)
        if other is None or other.derived:
            raise _err(where, "of", f"no stored feature {part!r} of entity {spec.entity!r}")
        if other.aggregate not in RATE_PARTS:
            raise _err(where, "of", f"{part!r} is a {other.aggregate}; a rate divides "
                       f"{', '.join(sorted(RATE_PARTS))}")
        missing = [lab for w, lab in zip(spec.windows, spec.window_labels, strict=True)
                   if w not in other.windows]
        if missing:
            raise _err(where, "windows", f"{part!r} has no window {missing[0]!r}")


def load_features(path: str | Path) -> list[FeatureSpec]:
    """Parse the ``[[features]]`` tables of a TOML file."""
    with open(path, "rb") as fh:
        return parse_features(tomllib.load(fh))


def as_specs(specs: Iterable[FeatureSpec | Mapping[str, Any]]) -> list[FeatureSpec]:
    """Accept parsed specs or raw dicts (parsed here) and return parsed specs."""
    items = list(specs)
    if all(isinstance(s, FeatureSpec) for s in items):
        return items  # type: ignore[return-value]
    return parse_features([s.to_dict() if isinstance(s, FeatureSpec) else s for s in items])


_POSITIVE = ["click", "like", "share", "purchase"]

#: The shipped default feature set, as config. Simulator logs (impression, click, like,
#: purchase, dwell, organic rating) and MovieLens logs (feedback ``rating``, value 1-5)
#: both populate it. Short-term interest: 5m/1h counts and the 1h last-K list; long-term:
#: decayed sums (half-lives of 1-30 days, never truncated) and 7d/30d counts.
DEFAULT_FEATURES: tuple[dict[str, Any], ...] = (
    # ---- user ----
    {"name": "impressions", "entity": "user", "filter": {"type": "impression"},
     "aggregate": "count", "windows": ["5m", "1h", "1d", "7d"]},
    {"name": "requests", "entity": "user", "filter": {"type": "request"},
     "aggregate": "count", "windows": ["5m", "1h", "1d"]},
    {"name": "clicks", "entity": "user", "filter": {"type": "feedback", "action": "click"},
     "aggregate": "count", "windows": ["5m", "1h", "1d", "7d", "30d"]},
    {"name": "likes", "entity": "user", "filter": {"type": "feedback", "action": "like"},
     "aggregate": "count", "windows": ["1h", "1d", "7d", "30d"]},
    {"name": "purchases", "entity": "user", "filter": {"type": "feedback", "action": "purchase"},
     "aggregate": "count", "windows": ["1d", "7d", "30d"]},
    {"name": "click_decay", "entity": "user", "filter": {"type": "feedback", "action": "click"},
     "aggregate": "decay_sum", "half_life": "1d", "windows": ["all"]},
    {"name": "engagement_decay", "entity": "user",
     "filter": {"type": "feedback", "action": _POSITIVE},
     "aggregate": "decay_sum", "half_life": "7d", "windows": ["all"]},
    {"name": "dwell", "entity": "user", "filter": {"type": "feedback", "action": "dwell"},
     "aggregate": "sum", "windows": ["1h", "1d"]},
    {"name": "dwell_mean", "entity": "user", "filter": {"type": "feedback", "action": "dwell"},
     "aggregate": "mean", "windows": ["7d"]},
    {"name": "ratings", "entity": "user", "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "count", "windows": ["1d", "7d", "all"]},
    {"name": "rating_mean", "entity": "user", "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "mean", "windows": ["1d", "7d", "all"]},
    {"name": "rating_decay", "entity": "user", "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "decay_sum", "half_life": "30d", "windows": ["all"]},
    {"name": "high_rating_decay", "entity": "user",
     "filter": {"type": "feedback", "action": "rating", "min_value": 4},
     "aggregate": "decay_sum", "value": 1, "half_life": "7d", "windows": ["all"]},
    {"name": "recent_positives", "entity": "user",
     "filter": {"type": "feedback", "action": _POSITIVE},
     "aggregate": "last_k", "k": 20, "windows": ["1h", "all"]},
    {"name": "recent_high_ratings", "entity": "user",
     "filter": {"type": "feedback", "action": "rating", "min_value": 4},
     "aggregate": "last_k", "k": 20, "windows": ["all"]},
    {"name": "clicked_items", "entity": "user", "filter": {"type": "feedback", "action": "click"},
     "aggregate": "distinct_count", "windows": ["1d", "7d"]},
    {"name": "last_feedback_ts", "entity": "user", "filter": {"type": "feedback"},
     "aggregate": "last", "value": "ts", "windows": ["all"]},
    {"name": "last_impression_ts", "entity": "user", "filter": {"type": "impression"},
     "aggregate": "last", "value": "ts", "windows": ["all"]},
    # ---- item ----
    {"name": "impressions", "entity": "item", "filter": {"type": "impression"},
     "aggregate": "count", "windows": ["1h", "1d", "7d"]},
    {"name": "clicks", "entity": "item", "filter": {"type": "feedback", "action": "click"},
     "aggregate": "count", "windows": ["1h", "1d", "7d"]},
    {"name": "likes", "entity": "item", "filter": {"type": "feedback", "action": "like"},
     "aggregate": "count", "windows": ["1d", "7d"]},
    {"name": "purchases", "entity": "item", "filter": {"type": "feedback", "action": "purchase"},
     "aggregate": "count", "windows": ["1d", "7d"]},
    {"name": "click_decay", "entity": "item", "filter": {"type": "feedback", "action": "click"},
     "aggregate": "decay_sum", "half_life": "1d", "windows": ["all"]},
    {"name": "engagement_decay", "entity": "item",
     "filter": {"type": "feedback", "action": _POSITIVE},
     "aggregate": "decay_sum", "half_life": "7d", "windows": ["all"]},
    {"name": "ratings", "entity": "item", "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "count", "windows": ["7d", "all"]},
    {"name": "rating_mean", "entity": "item", "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "mean", "windows": ["all"]},
    {"name": "viewers", "entity": "item", "filter": {"type": "impression"},
     "aggregate": "distinct_count", "value": "user_id", "windows": ["1d", "7d"]},
    # ---- user x item category ----
    {"name": "impressions", "entity": "user_x_category", "filter": {"type": "impression"},
     "aggregate": "count", "windows": ["1d", "7d"]},
    {"name": "clicks", "entity": "user_x_category",  # 5m / 1h: a taste that moves
     "filter": {"type": "feedback", "action": "click"},
     "aggregate": "count", "windows": ["5m", "1h", "1d", "7d", "30d"]},
    {"name": "engagement_decay", "entity": "user_x_category",
     "filter": {"type": "feedback", "action": _POSITIVE},
     "aggregate": "decay_sum", "half_life": "7d", "windows": ["all"]},
    {"name": "rating_mean", "entity": "user_x_category",
     "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "mean", "windows": ["all"]},
    {"name": "rating_decay", "entity": "user_x_category",
     "filter": {"type": "feedback", "action": "rating"},
     "aggregate": "decay_sum", "half_life": "30d", "windows": ["all"]},
)

#: Position-corrected click rates (COEC: clicks per 100 of position-discounted exposure)
#: per item and per user x category, to add to a feature set:
#: ``[*DEFAULT_FEATURES, *RATE_FEATURES]``. Not in the default set: in the closed loop they
#: changed nothing beyond the noise between seeds (docs/evaluation.md).
RATE_FEATURES: tuple[dict[str, Any], ...] = (
    {"name": "exposure", "entity": "item", "filter": {"type": "impression"},
     "aggregate": "sum", "value": "position", "transform": "position_discount",
     "windows": ["1h", "1d", "7d"]},
    {"name": "ctr", "entity": "item", "aggregate": "rate",
     "of": ["clicks", "exposure"], "windows": ["1h", "1d", "7d"]},
    {"name": "exposure", "entity": "user_x_category", "filter": {"type": "impression"},
     "aggregate": "sum", "value": "position", "transform": "position_discount",
     "windows": ["1h", "1d", "7d"]},
    {"name": "ctr", "entity": "user_x_category", "aggregate": "rate",
     "of": ["clicks", "exposure"], "windows": ["1h", "1d", "7d"]},
)


def default_features(entity: str | None = None) -> list[FeatureSpec]:
    """The parsed default set, optionally only one entity's features."""
    specs = parse_features(list(DEFAULT_FEATURES))
    return [s for s in specs if entity is None or s.entity == entity]
