"""What a profile store is configured with: its parameters and its compiled feature plan.

No Bytewax in here. ``ProfileParams`` holds a store's parameters (validated once, kept
once: the store, its tiers and its snapshots all read this one object).
``ProfilePlan`` compiles the feature specs of one entity kind into flat per-feature
and per-output tables (aggregate algebra, value getter, horizon, output names and
defaults) and the event routing table ``(type, action) -> features``, so the store's
write and read paths index lists instead of interpreting specs.

>>> params = ProfileParams(raw_ms=30_000)
>>> params.g0, params.tiers[-1]
(60000, (86400000, None))
>>> from state.feature_spec import default_features
>>> plan = ProfilePlan(default_features("user"), "user", params)
>>> "user.clicks.1h" in plan.out_names
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from events.model import _Record
from state.aggregates import BAD, EXACT_INCREMENTAL, fold_kind, make_agg, make_prep
from state.bounded import memo_put
from state.feature_spec import MISSING, RATE_SCALE, FeatureSpec, parse_duration
from state.hashing import stable_hash64

FAR = 1 << 62
""""Never" / "infinitely late", in ms."""
DEFAULT_TIERS: tuple[tuple[int, int | None], ...] = (
    (60_000, 3_600_000),  # 1-minute slices for data younger than 1 hour
    (3_600_000, 86_400_000),  # 1-hour slices for data younger than 1 day
    (86_400_000, None),  # 1-day slices beyond, up to truncation
)
"""(granularity ms, span ms or None) per tier, finest first."""
MAX_CROSS_KEYS = 16_384
"""``(user_id, attribute value)`` pairs whose ``user_x_<attr>`` profile key a plan keeps
(``ProfilePlan.cross_key``; ~150 B each)."""
MAX_KEYS = 4_096
"""String ``user`` / ``item`` ids whose profile key a plan keeps (``ProfilePlan.key``;
~130 B each: flows/memory.py ``profile_key``)."""
ItemAttrs = Callable[[Any], Mapping[str, Any] | None]
"""``item_id -> attrs dict`` (or None): where ``user_x_<attr>`` stores read an item's attribute."""
WriteStep = tuple[int, Any, Any, str | None, Any, Callable[[Any], Any], Callable[[Any], Any]]
"""How an event writes feature f: ``(f, min_value, const, field, default, getter, prep)``
(``ProfilePlan``'s tables of f side by side; ``const`` is ``MISSING`` when the value is
read from the event: from its top-level ``field`` (``default`` when absent) by the
event's ``field_reader``, or by ``getter`` when ``field`` is None: a dotted path)."""
MAX_ROUTES = 256
"""``(type, action)`` pairs whose write steps a plan keeps (``ProfilePlan.write_steps``)."""


FieldReader = Callable[[Any, str, Any], Any]
"""``reader(event, name, default)``: an event field's value, as ``event.get(name, default)``."""
FIELD_READERS: dict[type, FieldReader] = {}
"""``field_reader``'s memo: event class -> its reader (one per class of event)."""


def field_reader(cls: type) -> FieldReader:
    """How a store reads the fields of an event of class ``cls``: ``getattr`` for a typed
    record (``events.model``, whose ``get`` is ``getattr(self, name, default)``: the same
    values without a Python-level call per field), else the class's own ``get`` unbound
    (``dict.get`` for a dict). Memoised per class.

    >>> field_reader(dict)({"ts": 5}, "ts", None), field_reader(dict)({}, "action", None)
    (5, None)
    """
    reader = FIELD_READERS.get(cls)
    if reader is None:
        reader = FIELD_READERS[cls] = getattr if getattr(cls, "get", None) is _Record.get else cls.get
    return reader


def parse_tiers(tiers: Sequence[Sequence[Any]]) -> tuple[tuple[int, int | None], ...]:
    """Validated ``((granularity_ms, span_ms | None), ...)``; durations may be strings."""
    out: list[tuple[int, int | None]] = []
    for i, t in enumerate(tiers):
        if len(t) != 2:
            raise ValueError(f"tiers[{i}]: expected (granularity, span), got {t!r}")
        g = parse_duration(t[0], f"tiers[{i}] granularity")
        span = None if t[1] is None else parse_duration(t[1], f"tiers[{i}] span")
        out.append((g, span))
    if not out:
        raise ValueError("tiers: at least one tier is required")
    for i in range(1, len(out)):
        g0, s0 = out[i - 1]
        g1, s1 = out[i]
        if s0 is None:
            raise ValueError(f"tiers[{i - 1}]: only the last tier may have span None")
        if g1 % g0 or g1 <= g0:
            raise ValueError(f"tiers[{i}]: granularity {g1} ms must be a multiple of {g0} ms")
        if s1 is not None and s1 < s0:
            raise ValueError(f"tiers[{i}]: span must not be shorter than the previous one")
    if out[-1][1] is not None:
        out[-1] = (out[-1][0], None)
    return tuple(out)


@dataclass(frozen=True)
class ProfileParams:
    """A profile store's parameters (times in ms). See ``state.profiles`` for their roles.

    ``tiers``: slice granularity and span per tier (parsed by ``parse_tiers``);
    ``raw_ms``: how long events stay unaggregated; ``lateness_ms``: watermark lag;
    ``retention_ms``: kept past the longest finite window; ``batch_size`` writes or
    ``flush_interval_ms`` of event time per merge of the write buffer; ``hot_capacity``
    decoded profiles; ``compress_level`` (zlib) at rest; ``max_entities`` (0 = no limit).

    >>> ProfileParams()  # the defaults  # doctest: +NORMALIZE_WHITESPACE
    ProfileParams(tiers=((60000, 3600000), (3600000, 86400000), (86400000, None)),
                  raw_ms=60000, lateness_ms=5000, retention_ms=3600000, batch_size=1024,
                  flush_interval_ms=1000, hot_capacity=10000, compress_level=6, max_entities=0)
    >>> ProfileParams(tiers=[("1m", "1h"), ("1d", None)]).tiers
    ((60000, 3600000), (86400000, None))
    """

    tiers: tuple[tuple[int, int | None], ...] = DEFAULT_TIERS
    raw_ms: int = 60_000
    lateness_ms: int = 5_000
    retention_ms: int = 3_600_000
    batch_size: int = 1024
    flush_interval_ms: int = 1_000
    hot_capacity: int = 10_000
    compress_level: int = 6
    max_entities: int = 0

    def __post_init__(self) -> None:
        tiers = parse_tiers(self.tiers)
        object.__setattr__(self, "tiers", tiers)
        for name in ("raw_ms", "lateness_ms", "retention_ms", "flush_interval_ms"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (ms), got {val!r}")
        if tiers[0][1] is not None and self.raw_ms + tiers[0][0] > tiers[0][1]:
            raise ValueError("raw_ms: must be <= the finest tier's span minus its granularity")
        if self.batch_size < 1 or self.hot_capacity < 1:
            raise ValueError("batch_size and hot_capacity must be >= 1")
        if self.max_entities < 0:
            raise ValueError("max_entities must be >= 0 (0 = no limit)")

    @property
    def g0(self) -> int:
        """The finest slice granularity (ms)."""
        return self.tiers[0][0]

    @property
    def hot_limit(self) -> int:
        """Decoded profiles kept at most (``hot_capacity``, capped by ``max_entities``)."""
        return min(self.hot_capacity, self.max_entities) if self.max_entities else self.hot_capacity

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tiers as lists) for snapshots; ``ProfileParams(**d)`` reads it back."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["tiers"] = [list(t) for t in self.tiers]
        return out


def entity_key(entity_kind: str, entity_id: Any) -> int:
    """Stable 64-bit key of an entity; ``user_x_<attr>`` ids are ``(user_id, attr_value)``.

    >>> entity_key("user_x_genre", ("u1", "drama")) == entity_key("user_x_genre", ["u1", "drama"])
    True
    """
    if entity_kind.startswith("user_x_"):
        if not isinstance(entity_id, (tuple, list)) or len(entity_id) != 2:
            raise TypeError(f"{entity_kind} ids are (user_id, attr_value) pairs, got {entity_id!r}")
        return stable_hash64(f"{entity_id[0]}\x1f{entity_id[1]}")
    return stable_hash64(entity_id)


class ProfilePlan:
    """The features of one entity kind compiled into flat tables (index f = feature,
    j = output, one output per window of a feature)."""

    def __init__(self, specs: Sequence[FeatureSpec], entity_kind: str,
                 params: ProfileParams) -> None:
        self.entity_kind = entity_kind
        self.all_specs: list[FeatureSpec] = [s for s in specs if s.entity == entity_kind]
        """Every spec of the entity kind, derived ones (``rate``) included."""
        self.specs: list[FeatureSpec] = [s for s in self.all_specs if not s.derived]
        """The stored features (index f)."""
        if not self.specs:
            kinds = sorted({s.entity for s in specs})
            raise ValueError(f"no feature spec has entity {entity_kind!r} (have: {kinds})")
        self.cross_attr = self.specs[0].cross_attr
        self.id_field = {"user": "user_id", "item": "item_id"}.get(entity_kind)
        """The event field holding the entity id (None: a ``user_x_<attr>`` pair)."""
        # per feature f
        self.aggs = [make_agg(s) for s in self.specs]
        self.getters = [s.value_getter() for s in self.specs]
        self.preps = [make_prep(s) for s in self.specs]
        self.horizon = [s.longest_window_ms + params.retention_ms for s in self.specs]
        self.incremental = [s.aggregate in EXACT_INCREMENTAL for s in self.specs]
        self.fold = [fold_kind(s.aggregate) for s in self.specs]
        """How a write folds into the previous one of its feature (``fold_kind``)."""
        self.has_all = [s.has_all for s in self.specs]
        self.min_values = [s.min_value for s in self.specs]
        self.fields = [self._top_field(s) for s in self.specs]
        """The top-level event field feature f's value is read from and its default when
        absent (``value``: 1.0, another field: ``MISSING``), as ``getters[f]`` reads it;
        ``(None, MISSING)`` for a constant or a dotted path (read by ``getters[f]``)."""
        self.consts = [self._const_value(s) for s in self.specs]
        """The stored value of every write of feature f when it does not depend on the
        event (a count's 1, a constant value prepared), else ``MISSING``."""
        self.feat_outs: list[list[int]] = []
        # per output j
        self.out_names: list[str] = []
        self.out_feat: list[int] = []
        self.out_w: list[int | None] = []
        self.defaults: dict[str, Any] = {}
        self.decay_outs: list[tuple[int, str, float]] = []  # (j, name, half-life ms)
        self.list_outs: list[str] = []  # last_k outputs (a fresh list per answer)
        for f, s in enumerate(self.specs):
            js = []
            for w, name in zip(s.windows, s.output_names, strict=True):
                j = len(self.out_names)
                js.append(j)
                self.out_names.append(name)
                self.out_feat.append(f)
                self.out_w.append(w)
                self.defaults[name] = s.default
                if s.aggregate == "decay_sum":
                    self.decay_outs.append((j, name, float(s.half_life_ms or 1)))
                if s.aggregate == "last_k":
                    self.list_outs.append(name)
            self.feat_outs.append(js)
        self.feat_out_specs: list[tuple[tuple[int, int | None, str], ...]] = [
            tuple((j, self.out_w[j], self.out_names[j]) for j in js) for js in self.feat_outs]
        """Per feature f: (output j, its window in ms or None, its name) of each output."""
        self.rates: list[tuple[str, str, str, float]] = [
            (name, f"{s.entity}.{s.of[0]}.{lab}", f"{s.entity}.{s.of[1]}.{lab}", s.prior)
            for s in self.all_specs if s.of is not None
            for name, lab in zip(s.output_names, s.window_labels, strict=True)]
        """Derived outputs (name, numerator output, denominator output, prior), after the
        stored ones."""
        self.route = self._routes()
        self.steps: dict[tuple[str, str | None], tuple[WriteStep, ...]] = {}
        """``write_steps``' memo: (type, action) -> its write steps."""
        self.keys: dict[str, int] = {}
        """``key``'s memo: string id -> its key (no other type: 1, True and 1.0 are one
        dict key but three ids)."""
        self._cross_keys: dict[tuple[Any, Any], int] = {}

    @staticmethod
    def _top_field(spec: FeatureSpec) -> tuple[str | None, Any]:
        """``ProfilePlan.fields`` of one spec (``state.feature_spec``'s field getter:
        ``event.get(field, default)`` for a field name without dots)."""
        v = spec.value
        if not isinstance(v, str) or "." in v:
            return None, MISSING
        return v, 1.0 if v == "value" else MISSING

    @staticmethod
    def _const_value(spec: FeatureSpec) -> Any:
        """``ProfilePlan.consts`` of one spec: ``prep(getter(event))`` when the getter
        reads no event field and the value is not ``BAD``, else ``MISSING``."""
        if isinstance(spec.value, str):
            return MISSING
        v = make_prep(spec)(spec.value_getter()({}))
        return MISSING if v is BAD else v

    def add_rates(self, out: dict[str, Any]) -> dict[str, Any]:
        """``out`` (stored outputs) with every ``rate`` output added:
        ``RATE_SCALE * numerator / (denominator + prior)``, 0.0 when both are 0."""
        for name, num, den, prior in self.rates:
            d = (out[den] or 0.0) + prior
            out[name] = RATE_SCALE * (out[num] or 0.0) / d if d > 0.0 else 0.0
        return out

    def _routes(self) -> dict[tuple[str, Any], list[int]]:
        """(type, action) -> feature indices; (type, None) -> the action-agnostic ones."""
        any_by_type: dict[str, list[int]] = {}
        by_action: dict[tuple[str, str], list[int]] = {}
        for f, s in enumerate(self.specs):
            if s.actions is None:
                any_by_type.setdefault(s.event_type, []).append(f)
            else:
                for a in s.actions:
                    by_action.setdefault((s.event_type, a), []).append(f)
        route: dict[tuple[str, Any], list[int]] = {(t, None): fs for t, fs in any_by_type.items()}
        for (t, a), fs in by_action.items():
            route[(t, a)] = sorted(fs + any_by_type.get(t, []))
        return route

    def features_for(self, etype: str, action: str | None) -> list[int] | None:
        """Indices of the features an event of this type and action feeds (None: none)."""
        fids = self.route.get((etype, action))
        return self.route.get((etype, None)) if fids is None else fids

    def write_steps(self, etype: str, action: str | None) -> tuple[WriteStep, ...]:
        """The write steps of ``features_for(etype, action)``'s features, in its order (the
        empty tuple: none), memoised per pair (at most ``MAX_ROUTES``, cleared when full)."""
        pair = (etype, action)
        steps = self.steps.get(pair)
        if steps is None:
            steps = tuple((f, self.min_values[f], self.consts[f], *self.fields[f], self.getters[f],
                           self.preps[f]) for f in self.features_for(etype, action) or ())
            memo_put(self.steps, pair, steps, MAX_ROUTES)
        return steps

    def empty_outputs(self) -> dict[str, Any]:
        """Every output at its empty-window default (a fresh list for last_k)."""
        out = dict(self.defaults)
        for name in self.list_outs:
            out[name] = []
        return out

    def key(self, entity_id: Any) -> int:
        """``stable_hash64(entity_id)`` of a ``user`` or ``item`` id; string ids' keys are
        memoised (at most ``MAX_KEYS``, cleared when full: an item's impressions and a
        user's events hash their id once while it stays in the memo)."""
        if type(entity_id) is not str:  # 1, True and 1.0 are one dict key, not one hash
            return stable_hash64(entity_id)
        keys = self.keys
        key = keys.get(entity_id)
        if key is None:
            if len(keys) >= MAX_KEYS:
                keys.clear()
            key = keys[entity_id] = stable_hash64(entity_id)
        return key

    def cross_key(self, user_id: Any, value: Any) -> int:
        """``entity_key`` of the ``user_x_<attr>`` profile ``(user_id, value)``, memoised
        (at most ``MAX_CROSS_KEYS``, cleared when full): writes and queries of a user's
        profile per attribute value hash it once."""
        pair = (user_id, value)
        key = self._cross_keys.get(pair)
        if key is None:
            if len(self._cross_keys) >= MAX_CROSS_KEYS:
                self._cross_keys.clear()
            key = self._cross_keys[pair] = stable_hash64(f"{user_id}\x1f{value}")
        return key

    def cross_keys_for(self, event: Mapping[str, Any], item_attrs: ItemAttrs | None,
                       get: FieldReader) -> tuple[list[int], str | None]:
        """(the ``user_x_<attr>`` keys an event writes to, or [] with the reason counter
        to bump); a ``user`` or ``item`` store's one key is ``key(event[id_field])``.
        ``get``: the event's ``field_reader``."""
        uid, iid = get(event, "user_id", None), get(event, "item_id", None)
        if uid is None or iid is None:
            return [], "skipped_no_id"
        if item_attrs is None:
            raise TypeError(f"{self.entity_kind} store needs item_attrs (item_id -> attrs dict) in apply()")
        attrs = item_attrs(iid) or {}
        av = attrs.get(self.cross_attr)
        if type(av) is str:  # one value (a category): the usual case
            key = self._cross_keys.get((uid, av))  # cross_key's memo
            return [self.cross_key(uid, av) if key is None else key], None
        if av is None or av == [] or av == ():
            return [], "skipped_no_attr"
        vals = av if isinstance(av, (list, tuple)) else (av,)
        keys = [self.cross_key(uid, a) for a in dict.fromkeys(
            a for a in vals if isinstance(a, (str, int)) and not isinstance(a, bool))]
        return keys, None if keys else "skipped_no_attr"
