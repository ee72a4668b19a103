"""The wire form of training examples: a versioned feature vocabulary, short values.

Examples leave the flow (``examples`` topic or file) one row per example. The row
keeps the fields readers filter on (``example_id``, ``ts``, ``user_id``, ``item_id``,
``label``, ``weight``, ``position``) under their names and drops what it can rebuild:

* ``labels`` ``{}``, ``request_id`` None and ``context`` ``{}`` are left out;
  ``impression_id`` is left out when it is ``example_id`` without its ``imp:``
  prefix (None for other examples), ``source`` when the prefix says it (``imp:``
  impression, ``int:`` interaction, ``neg:`` sampled).
* ``features`` become ``f3``: positions in :data:`VOCABULARY` (version 3; a new
  vocabulary is a new key, old rows keep reading: ``f1`` and ``f2`` rows decode with
  versions 1 and 2). ``[mask, v...]``: ``mask``
  the hex bit set of the vocabulary names present (bit i = name i), the values in
  vocabulary order; when a name is not in the vocabulary or the names are not in its
  order, ``[[key, ...], v...]`` with a vocabulary position or the name for each key.
* Values: a float with an integer value is written as an integer (``10`` for
  ``10.0``; read back as a float), a list equal to an earlier list of the row as
  ``{"=": j}`` (value j; ``user.recent_positives.1h`` and ``.all`` are often the
  same), an int as ``{"i": n}``; strings, bools, other floats and lists as they are.
  No feature has a dict value (``models.features.compact`` drops them), so a dict
  is always one of these two marks.

``unpack_example`` restores the exact record ``pack_example`` was given, keys in
the same order (River sums a linear model's terms in key order: the trainer flow
learns bit for bit what the in-flow trainer learns). A record of another shape
(other fields or order) is written with its features grouped by dotted prefix (the
previous wire form, which ``unpack_example`` still reads), and a plain record
unpacks to itself. Floats are already rounded to float32 precision when the
joiner builds the example (``state.join_state.float32_features``), so the in-flow
trainer and the readers see the same numbers. Readers: ``flows/trainer.py``,
``streamrec tap``.
"""

from __future__ import annotations

from typing import Any

from events.model import Impression, Record
from state.join_state import RowForm, impression_record

VOCABULARY_1: tuple[str, ...] = (
    "user.impressions.5m", "user.impressions.1h", "user.impressions.1d", "user.impressions.7d",
    "user.requests.5m", "user.requests.1h", "user.requests.1d",
    "user.clicks.5m", "user.clicks.1h", "user.clicks.1d", "user.clicks.7d", "user.clicks.30d",
    "user.likes.1h", "user.likes.1d", "user.likes.7d", "user.likes.30d",
    "user.purchases.1d", "user.purchases.7d", "user.purchases.30d",
    "user.click_decay.all", "user.engagement_decay.all",
    "user.dwell.1h", "user.dwell.1d", "user.dwell_mean.7d",
    "user.ratings.1d", "user.ratings.7d", "user.ratings.all",
    "user.rating_mean.1d", "user.rating_mean.7d", "user.rating_mean.all",
    "user.rating_decay.all", "user.high_rating_decay.all",
    "user.recent_positives.1h", "user.recent_positives.all", "user.recent_high_ratings.all",
    "user.clicked_items.1d", "user.clicked_items.7d",
    "user.last_feedback_ts.all", "user.last_impression_ts.all",
    "u:age_bucket", "u:country",
    "item.click_decay.all", "item.clicks.1d", "item.clicks.1h", "item.clicks.7d",
    "item.engagement_decay.all", "item.impressions.1d", "item.impressions.1h",
    "item.impressions.7d", "item.likes.1d", "item.likes.7d", "item.purchases.1d",
    "item.purchases.7d", "item.rating_mean.all", "item.ratings.7d", "item.ratings.all",
    "item.viewers.1d", "item.viewers.7d",
    "i:category", "i:price",
    "pop", "trend", "covis", "covis_any", "mf", "ui.category", "ui.interacted", "ui.liked",
    "user_x_category.impressions.1d", "user_x_category.impressions.7d",
    "user_x_category.clicks.1d", "user_x_category.clicks.7d", "user_x_category.clicks.30d",
    "user_x_category.engagement_decay.all", "user_x_category.rating_mean.all",
    "user_x_category.rating_decay.all",
)
"""Version 1 of the feature vocabulary (key ``f1``): the default config's feature names
(``state.feature_spec.DEFAULT_FEATURES``, the serving extras of
``operators.point_in_time``, the simulator's user and item attributes) in the order the
flow writes them; ``ui.category`` (a drift experiment, since dropped) keeps its position.
Frozen: rows written with ``f1`` keep their meaning."""

_XCAT_CLICKS_1D = VOCABULARY_1.index("user_x_category.clicks.1d")
VOCABULARY_2: tuple[str, ...] = (
    *VOCABULARY_1[:_XCAT_CLICKS_1D],
    "user_x_category.clicks.5m", "user_x_category.clicks.1h",  # default since version 2
    *VOCABULARY_1[_XCAT_CLICKS_1D:],
)
"""Version 2 (key ``f2``): version 1 with the default ``user_x_category.clicks`` windows
5m and 1h in the flow's order. Frozen."""

_UI_LIKED = VOCABULARY_2.index("ui.liked")
VOCABULARY: tuple[str, ...] = (
    *VOCABULARY_2[:_UI_LIKED + 1],
    "category_posterior",  # default since version 3 (serving.category_explore.ranker_feature)
    *VOCABULARY_2[_UI_LIKED + 1:],
)
"""The vocabulary written now, version 3 (key ``f3``): version 2 with the category
sampling's ``category_posterior`` after the user x item columns, in the flow's order. A
name outside it, or names in another order, cost a row its mask (it spells its keys);
changing it means a new version and key, and the old ones stay readable
(:data:`VOCABULARIES`)."""

KEY = "f3"
"""The key of the features in the wire form written now."""

VOCABULARIES: dict[str, tuple[str, ...]] = {"f1": VOCABULARY_1, "f2": VOCABULARY_2,
                                           KEY: VOCABULARY}
"""Every vocabulary a row may be written with, by key."""

_INDEX = {name: i for i, name in enumerate(VOCABULARY)}
_FIELDS = ("example_id", "ts", "user_id", "item_id", "label", "labels", "weight", "position",
           "request_id", "impression_id", "context", "features", "source")
_SOURCES = {"imp:": "impression", "int:": "interaction", "neg:": "sampled"}
_MAX_EXACT = 2.0 ** 53


def pack_example(example: Record) -> Record:
    """``example``'s wire form (a new record; the input is kept)."""
    if tuple(example) != _FIELDS:
        return _grouped(example)
    packed = _pack(example["example_id"], example["ts"], example["user_id"], example["item_id"],
                   example["label"], example["labels"], example["weight"], example["position"],
                   example["request_id"], example["impression_id"], example["context"],
                   example["features"], example["source"])
    return example if packed is None else packed


def pack_impression(imp: Impression, label: int, labels: dict[str, float], weight: float,
                    features: dict[str, Any] | list[Any]) -> Record:
    """``pack_example(impression_record(imp, label, labels, weight, features))``, built
    without the record (the joiner's rows when nothing in the flow reads the full record:
    ``state.join_state.RowForm``). ``features`` a dict, or already its wire value (a list:
    deferred features resolved straight to it, ``join_parts``)."""
    iid = imp.impression_id
    if type(features) is list:  # _pack with the features already encoded
        return pack_impressions([imp], [labels], label, weight, [features])[0]
    packed = _pack(f"imp:{iid}", imp.ts, imp.user_id, imp.item_id, label, labels, weight,
                   imp.position, imp.request_id, iid, imp.context, features, "impression")  # type: ignore[arg-type]
    if packed is None:
        return impression_record(imp, label, labels, weight, features)  # type: ignore[arg-type]
    return packed


def pack_impressions(imps: list[Impression], labels: list[dict[str, float]], label: int,
                     weight: float, features: list[dict[str, Any] | list[Any]]) -> list[Record]:
    """``pack_impression`` of each impression, all with ``label`` and ``weight`` (labels
    copied): the rows of windows that close together, in one pass. A row whose features
    are already encoded (a list) is ``_pack``'s, built here without the record."""
    out: list[Record] = []
    append = out.append
    for imp, lab, feats in zip(imps, labels, features, strict=True):
        if type(feats) is not list:
            append(pack_impression(imp, label, dict(lab) if lab else {}, weight, feats))
            continue
        request, context = imp.request_id, imp.context
        if not lab and request is not None and context:  # the common row, in one display
            append({"example_id": "imp:" + imp.impression_id, "ts": imp.ts,
                    "user_id": imp.user_id, "item_id": imp.item_id, "label": label,
                    "weight": weight, "position": imp.position, "request_id": request,
                    "context": context, KEY: feats})
            continue
        row: Record = {"example_id": "imp:" + imp.impression_id, "ts": imp.ts,
                       "user_id": imp.user_id, "item_id": imp.item_id, "label": label}
        if lab:
            row["labels"] = dict(lab)
        row["weight"] = weight
        row["position"] = imp.position
        if imp.request_id is not None:
            row["request_id"] = imp.request_id
        if imp.context:
            row["context"] = imp.context
        row[KEY] = feats
        append(row)
    return out


EncodedPart = tuple[tuple[str, ...], list[Any]]
"""A features dict without list, tuple or dict values as its names and encoded values
(``_encode``'s, value by value): rows whose features are such parts with disjoint names
are the concatenation of the parts (``join_parts``), without the merged dict."""


def encoded_part(features: dict[str, Any]) -> EncodedPart | None:
    """``features`` as an ``EncodedPart``; None when a value is a list, tuple or dict (a
    list may be written as a reference to an earlier one of the row: not a part)."""
    values: list[Any] = []
    for value in features.values():
        kind = type(value)
        if kind is float:
            if value.is_integer() and value != 0.0 and -_MAX_EXACT < value < _MAX_EXACT:
                value = int(value)
        elif kind is int:
            value = {"i": value}
        elif kind is list or kind is tuple or kind is dict:
            return None
        values.append(value)
    return tuple(features), values


def join_parts(*parts: EncodedPart) -> list[Any]:
    """The ``KEY`` value of the features ``{**a, **b, ...}`` of parts with disjoint names:
    ``_encode({**a, **b, ...})``, from the parts."""
    two = len(parts) == 2
    names = (parts[0][0], parts[1][0]) if two else tuple([part[0] for part in parts])
    head = _PART_HEADS.get(names)
    if head is None:
        if len(_PART_HEADS) >= _MAX_HEADS:
            _PART_HEADS.clear()
        head = _PART_HEADS[names] = _head(sum(names, ()))
    if type(head) is not str:
        head = list(head)  # type: ignore[assignment]
    if two:
        return [head, *parts[0][1], *parts[1][1]]
    out = [head]
    for part in parts:
        out += part[1]
    return out


def unwire_features(encoded: list[Any]) -> dict[str, Any]:
    """The features dict of a ``KEY`` value (``_encode``'s or ``join_parts``' output)."""
    return _decode(encoded, VOCABULARY)


WIRE_ROWS = RowForm(pack_impression, pack_example, pack_impressions, unwire_features, wire=True)
"""The joiner writing wire-form rows (``Joiner(rows=WIRE_ROWS)``)."""


def _pack(example_id: str, ts: int, user_id: str, item_id: str, label: int,
          labels: dict[str, float], weight: float, position: int, request_id: str | None,
          impression_id: str | None, context: dict[str, Any], features: dict[str, Any],
          source: str) -> Record | None:
    """The wire form of an example given field by field; None when a feature value is a
    dict (such examples stay plain)."""
    prefix = example_id[:4]
    out: Record = {"example_id": example_id, "ts": ts, "user_id": user_id, "item_id": item_id,
                   "label": label}
    if labels != {}:
        out["labels"] = labels
    out["weight"] = weight
    out["position"] = position
    if request_id is not None:
        out["request_id"] = request_id
    if impression_id != (example_id[4:] if prefix == "imp:" else None):
        out["impression_id"] = impression_id
    if context != {}:
        out["context"] = context
    encoded = _encode(features)
    if encoded is None:
        return None
    out[KEY] = encoded
    if source != _SOURCES.get(prefix):
        out["source"] = source
    return out


def unpack_example(record: Record) -> Record:
    """The example ``pack_example`` was given (other records are returned as they are)."""
    key = next((k for k in VOCABULARIES if k in record), None)
    if key is None or "features" in record:
        return _ungrouped(record)
    example_id = record["example_id"]
    return {"example_id": example_id, "ts": record["ts"], "user_id": record["user_id"],
            "item_id": record["item_id"], "label": record["label"],
            "labels": record.get("labels", {}), "weight": record["weight"],
            "position": record["position"], "request_id": record.get("request_id"),
            "impression_id": record.get("impression_id", _implied_impression(example_id)),
            "context": record.get("context", {}),
            "features": _decode(record[key], VOCABULARIES[key]),
            "source": record.get("source", _SOURCES.get(example_id[:4]))}


def _implied_impression(example_id: str) -> str | None:
    return example_id[4:] if example_id.startswith("imp:") else None


# -- features ---------------------------------------------------------------------------


def _encode(features: dict[str, Any]) -> list[Any] | None:
    """The ``KEY`` value of ``features``; None when a value is a dict (such records stay plain)."""
    values: list[Any] = []
    lists: list[tuple[list[Any], int]] = []
    for value in features.values():
        kind = type(value)
        if kind is str:
            values.append(value)
            continue
        if kind is dict:
            return None
        if kind is float:
            if value.is_integer() and value != 0.0 and -_MAX_EXACT < value < _MAX_EXACT:
                value = int(value)
        elif kind is int:
            value = {"i": value}
        elif kind is list or kind is tuple:
            for earlier, j in lists:
                if earlier == value:
                    value = {"=": j}
                    break
            else:
                lists.append((value, len(values)))
        values.append(value)
    names = tuple(features)
    head = _HEADS.get(names)
    if head is None:
        if len(_HEADS) >= _MAX_HEADS:
            _HEADS.clear()
        head = _HEADS[names] = _head(names)
    return [head if type(head) is str else list(head), *values]


def _head(names: tuple[str, ...]) -> str | tuple[int | str, ...]:
    """The first element of the encoded features with these names: the hex mask of their
    vocabulary positions, or (names not all in the vocabulary in its order) a vocabulary
    position or the name for each."""
    mask, last = 0, -1
    for name in names:
        i = _INDEX.get(name, -1)
        if i <= last:
            return tuple(_INDEX.get(name, name) for name in names)
        mask |= 1 << i
        last = i
    return format(mask, "x")


_HEADS: dict[tuple[str, ...], str | tuple[int | str, ...]] = {}
"""``_head`` by feature names: a flow writes rows of a few hundred name sets at most."""
_PART_HEADS: dict[tuple[tuple[str, ...], ...], str | tuple[int | str, ...]] = {}
"""``_head`` by the names of each part (``join_parts``)."""
_MAX_HEADS = 4096


def _decode(encoded: list[Any], vocabulary: tuple[str, ...]) -> dict[str, Any]:
    head, values = encoded[0], encoded[1:]
    if type(head) is str:
        mask = int(head, 16)
        names = [vocabulary[i] for i in range(mask.bit_length()) if mask >> i & 1]
    else:
        names = [vocabulary[k] if type(k) is int else k for k in head]
    out: dict[str, Any] = {}
    decoded: list[Any] = []
    for name, value in zip(names, values, strict=True):
        kind = type(value)
        if kind is int:
            value = float(value)
        elif kind is dict:
            value = int(value["i"]) if "i" in value else list(decoded[value["="]])
        decoded.append(value)
        out[name] = value
    return out


# -- the previous wire form: features grouped by dotted prefix --------------------------


def _grouped(example: Record) -> Record:
    """``example`` with its ``features`` grouped by prefix::

        {"user.clicks.1h": 2.0, "user.clicks.1d": 3.0, "pop": 1.5}
        -> {"user.": {"clicks.": {"1h": 2.0, "1d": 3.0}}, "pop": 1.5}
    """
    features = example.get("features")
    if not features or not any("." in name for name in features):
        return example  # nothing to group
    try:
        nested = _nest(list(features.items()))
    except _Clash:
        return example
    out = dict(example)
    out["features"] = nested
    return out


def _ungrouped(record: Record) -> Record:
    features = record.get("features")
    if not features or not any(type(v) is dict for v in features.values()):
        return record
    flat: dict[str, Any] = {}
    _flatten(features, "", flat)
    out = dict(record)
    out["features"] = flat
    return out


def _nest(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Group consecutive names with the same first dotted segment (two or more) under
    ``"<segment>."``, recursively; a segment that comes back later stays flat there."""
    out: dict[str, Any] = {}
    i, n = 0, len(items)
    while i < n:
        name, value = items[i]
        head, dot, _ = name.partition(".")
        j = i + 1
        if dot:
            while j < n and items[j][0].startswith(head + ".") and items[j][0] != head + ".":
                j += 1
        group = head + "."
        if dot and j - i > 1 and group not in out:
            out[group] = _nest([(k[len(group):], v) for k, v in items[i:j]])
            i = j
        else:
            if name in out:
                raise _Clash(name)
            out[name] = value
            i += 1
    return out


class _Clash(Exception):
    """A name equal to a group key (a name ending in ``.``): such features stay flat."""


def _flatten(nested: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in nested.items():
        if type(value) is dict and key.endswith("."):
            _flatten(value, prefix + key, out)
        else:
            out[prefix + key] = value
