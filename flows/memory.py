"""Memory under ID churn: a stream of ever-new IDs, and the resident memory it may use.

Every large structure of the flow is bounded by a capacity of the config (least
recently used entries dropped beyond it), so a stream that never repeats an ID makes
memory plateau instead of grow. ``churn_blocks`` writes such a stream;
``memory_bound`` turns a config into the resident-memory bound it sets
(docs/operations.md, "Bounded memory"); ``bench/memory_churn.py`` and
``tests/reliability/test_bounded_memory.py`` run the real flow on the stream and
compare its RSS with the bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import orjson

from operators.linear_scorer import MAX_ATTR_MEMO
from operators.point_in_time import MAX_STATIC_MEMO, MAX_VECTOR_MEMO, RETAINED_VERSIONS
from operators.serving import ANN_MEMO_USERS
from operators.user_shard import MAX_CATALOG_ATTRS
from state.aggregates import MAX_HASHES
from state.change_log import LOG as CATALOG_LOG
from state.covis_view import SLACK
from state.covisitation import KEEP_ARRAYS_BYTES
from state.npz import MAX_HEADERS
from state.profile_plan import MAX_KEYS, ProfileParams

if TYPE_CHECKING:
    from flows.config import Config

T0_MS = 1_767_225_600_000
"""Event time of the first churn event (2026-01-01, epoch ms)."""

def churn_blocks(n_ids: int, block_ids: int = 10, step_ms: int = 50,
                 request_every: int = 25) -> Iterator[list[bytes]]:
    """JSONL lines introducing ``n_ids`` distinct IDs (half users, half items), one list
    per block of ``block_ids`` new IDs (even, >= 4), blocks ``step_ms`` of event time
    apart.

    A block: ``block_ids / 2`` new items (``item`` events, 50 categories), new users who
    only send a ``user`` event, and one new user who sees and clicks the block's first
    item and the previous block's first item (impressions, clicks: the joiner,
    profiles, MF, co-visitation, the ranker and the index see new IDs all the time);
    every ``request_every`` blocks that user also asks for recommendations. So
    ``2 / block_ids`` of the IDs interact. Deterministic.
    """
    if block_ids < 4 or block_ids % 2:
        raise ValueError("block_ids must be even and >= 4")
    half = block_ids // 2
    dumps = orjson.dumps
    for b in range((n_ids + block_ids - 1) // block_ids):
        ts = T0_MS + b * step_ms
        first = half * b
        lines = [dumps({"type": "item", "ts": ts, "item_id": f"x{first + k}",
                        "attrs": {"category": f"c{(first + k) % 50}",
                                  "price": (first + k) % 97 + 0.5}})
                 for k in range(half)]
        lines += [dumps({"type": "user", "ts": ts, "user_id": f"u{first + k}",
                         "attrs": {"age": (first + k) % 80}}) for k in range(1, half)]
        user = f"u{first}"
        seen = [f"x{first}"] if b == 0 else [f"x{first}", f"x{first - half}"]
        lines += [dumps({"type": "impression", "ts": ts + 1 + j, "impression_id": f"m{b}-{j}",
                         "user_id": user, "item_id": item, "position": j})
                  for j, item in enumerate(seen)]
        lines += [dumps({"type": "feedback", "ts": ts + 10 + j, "user_id": user,
                         "item_id": item, "action": "click", "impression_id": f"m{b}-{j}"})
                  for j, item in enumerate(seen)]
        if b % request_every == 0:
            lines.append(dumps({"type": "request", "ts": ts + 20, "request_id": f"r{b}",
                                "user_id": user}))
        yield lines


BYTES: dict[str, float] = {
    "user": 1_700,
    "hot_user_profile": 10_000,
    "user_catalog_item": 360,
    "pending_impression": 3_130,
    "closed_impression": 110,
    "orphan": 500,
    "pool_item": 190,  # 120 measured, plus the sampling arrays kept side by side (67 B:
    # the position dict, the ids list, the float64 log scores; state.popularity.arrays)
    "duel_user": 2_700,
    "serving_slot": 158,  # measured before the 4 B feature row (ItemRows.feat_row) and the
    # 4 B column in the side-by-side rate matrix (ItemRows.profile_values), which the int32
    # generation counters (8 B less per slot) pay for; + 8 B: shard and category intp
    "covis_view_id": 182,  # 160 measured, plus the names' object array (8 B, 1.25x) and
    # serving's merge scratch (operators/candidates.py MergeScratch: two int32 per id);
    # + 4 B: ItemRows.slot_of intp
    "pool_candidate": 100,
    "mf_row": 310,
    "mf_item_log": 100,  # an item's place in ItemFactors' change tracking (49 B) and its
    # share of the change log, full at twice the places (50 B); models/mf.py
    "item": 700,
    "hot_item_profile": 6_000,
    "covis_neighbor": 105,  # a loaded table's row decoded for lookups (ItemTable.covis_row)
    "covis_loaded_row": 48,  # a loaded table's vocabulary as an object array (8 B a name)
    # and its row starts as ints (40 B a row), made at its first row read (FrozenCoVisitation)
    "covis_row_neighbor": 90,  # an item shard's live row (state.covisitation.Row): 105
    # measured with a float object per neighbour, 15 B less with the weights in one array
    "covis_written_row": 170,
    "loaded_table_item": 2_557,  # 2,500 measured, plus serving's per-version slot columns
    # (state/item_rows.py catalog_columns: two counts, a category index, a feature row, 24 B)
    # and every loaded table's side by side (loaded_columns: those and two catalog
    # columns, 33 B)
    "index_item": 500,
    "waiting_example": 3_100,
    "ranker_weight": 130,
    "routing_cache_entry": 150,
    "category_user": 1_200,
    "category_lifts_impression": 110,  # the ranker feature's lifts in a request's user
    # context (models/category_bandit.py CategoryLifts: ~1.1 KB with 20 categories),
    # shared by the request's ~10 pending impressions
    "category_user_change": 40,
    "category_user_time": 120,
    "category_group": 2_200,
    "category_list": 700,
    "category_item": 100,
    "static_memo_item": 1_000,
    "catalog_attrs_entry": 800,  # an item event held with its shared catalog entry (410 B and
    # 280 B by tracemalloc on the zero-config catalog; operators/user_shard.py catalog_attrs)
    "shared_by_attrs_entry": 1_400,  # the static features by the catalog entry's identity
    # (operators/point_in_time.py _SHARED_BY_ATTRS): a static memo item's values, which it
    # may hold alone once _SHARED_STATICS is cleared, the entry it keeps alive and a tuple
    "table_rate_item": 16,
    "category_row": 8,
    "ann_memo_user": 1_500,
    "catalog_log_key": 70,
    "queued_profile_write": 130,
    "profile_key": 120,  # 61 B of dict slot and int (tracemalloc), the id string it keeps
    "attr_memo_entry": 800,  # tracemalloc of 4,096 three-attribute sets (key and sum)
    "vector_memo_user": 700,  # a read-only copy's array header, its dict slot and key
    # (825 B by tracemalloc of 2,048 32-float vectors under new keys; plus 4 B a dimension)
    "npy_header_entry": 400,  # a memoised .npy header with its (dtype, shape) key (390 B by
    # tracemalloc of 4,096 two-dimensional shapes; state/npz.py _HEADERS, one per process)
}
"""Bytes per entry of each bounded structure, measured on CPython 3.11 (64-bit) with a
deep-size walk of every store at the plateau of the churn stream (one or two
interactions per ID) and for full co-visitation rows; docs/operations.md lists them.
An ID with a long history costs more per entry, within the per-entity limits (2,000
history items per user, profile windows)."""

QUEUED_WRITES = ProfileParams().batch_size
"""Writes a profile store's merge queue holds at most (the flow keeps the default)."""

ALLOCATOR_OVERHEAD = 1.25
"""Resident bytes per live byte (malloc arenas, fragmentation, interpreter caches)."""


def memory_bound(config: Config) -> dict[str, Any]:
    """The resident memory, MB, that the flow of ``config`` (one process holding every
    shard) may use above the process's memory before the flow starts: the sum over its
    bounded structures of capacity x bytes per entry (``BYTES``), times
    ``ALLOCATOR_OVERHEAD``. Returns ``{"total_mb", "parts_mb": {part: MB}}``.

    Parts: ``user_shards`` (users: history, attributes, profiles, duel; hot profiles;
    catalog copy; joiner; MF user rows; serving's candidate slots and view ids; pending pools;
    static item feature memo; category posteriors and lists), ``item_shards`` (items: catalog, counters,
    profiles; co-visitation rows, full; MF item rows), ``serving_tables`` (the loaded
    item tables, one version per shard, with their memoised category lists), ``index`` (builder and serving copies),
    ``retained_versions`` (replaced item tables or indexes that pending impressions'
    deferred features still read, ``operators.point_in_time.RETAINED_VERSIONS``),
    ``ranker`` (waiting examples; weights of the training, serving and pickled copies)
    and ``routing`` (the ID -> shard caches).
    """
    b = BYTES
    sh, join, items, mf, covis = config.shards, config.join, config.items, \
        config.items.mf_config(), config.items.covis_config()
    pool, explore = config.serving.pool, config.serving.category_explore
    kinds = {f.get("entity") for f in config.features}
    # distinct counts per store kind: each keeps string ids' hashes (state.aggregates._hash_prep)
    distinct = Counter(f.get("entity") for f in config.features
                       if f.get("aggregate") == "distinct_count")
    # each category's best items: one merged copy per user shard, one per loaded table
    category_lists = (explore.max_categories * (b["category_list"] + explore.retrieve_per_category
                                                * b["category_item"])
                      if explore.enabled and config.serving.sources.get("category", 0) > 0 else 0)
    user_kinds = len(kinds - {"item"})
    hot_users = min(sh.hot_profiles, sh.max_users)
    per_user_shard = (
        sh.max_users * b["user"]
        + user_kinds * hot_users * b["hot_user_profile"]
        # each profile store's closed write buffer waiting to be merged (at most one
        # buffer's writes: state.profiles.ProfileStore._close)
        + user_kinds * QUEUED_WRITES * b["queued_profile_write"]
        # the user store's memo of id -> profile key (state.profile_plan.ProfilePlan.key)
        + ("user" in kinds) * MAX_KEYS * b["profile_key"]
        + (sum(distinct.values()) - distinct["item"]) * MAX_HASHES * b["profile_key"]
        + sh.max_items * b["user_catalog_item"]
        + join.max_pending * (b["pending_impression"] + 4 * b["closed_impression"])
        + join.max_orphans * b["orphan"]
        + 1.25 * join.popularity_pool * b["pool_item"]
        + min(100_000, sh.max_users) * b["duel_user"]
        # serving's per-candidate slots (state/item_rows.py: dropped past max(16k, SLACK x the
        # loaded tables' items)) and the pool ranker's pending pools (one per user)
        + max(16_384, SLACK * sh.items * items.max_items) * b["serving_slot"]
        # and the co-visitation view's ids (state/covis_view.py, same bound: a new view)
        + max(16_384, SLACK * sh.items * items.max_items) * b["covis_view_id"]
        + (pool.max_pending * pool.pool_size * b["pool_candidate"] if pool.enabled else 0)
        + (mf.max_users * b["mf_row"] if items.enabled else 0)
        # the users' MF vectors read since the last MF step (point_in_time.py _user_vector)
        + (MAX_VECTOR_MEMO * (b["vector_memo_user"] + 4 * mf.dim) if items.enabled else 0)
        # serving's last ANN answer per recent user (Server._ann_rows: 100 rows and scores
        # as int32 / float32, the vector's bytes)
        + ANN_MEMO_USERS * b["ann_memo_user"]
        # the catalog's log of written items (state/change_log.py: a reference each, the
        # key kept alive after an eviction)
        + CATALOG_LOG * b["catalog_log_key"]
        # the joiner's memo of static item features (~550 B an entry in the churn test)
        + MAX_STATIC_MEMO * b["static_memo_item"]
        # serving's category posteriors: a user's counts and one item's click rate per user
        + (explore.max_users * b["category_user"] if explore.enabled else 0)
        # the lifts the ranker feature takes into each pending request's user context
        + (join.max_pending * b["category_lifts_impression"]
           if explore.enabled and explore.ranker_feature else 0)
        # the change detector's CUSUM and flag per user; the attribute groups' counts
        + (explore.max_users * b["category_user_change"]
           if explore.enabled and explore.change_threshold > 0 else 0)
        + (explore.max_groups * b["category_group"]
           if explore.enabled and explore.group_prior > 0 else 0)
        # the event time of each user's last list (half_life_s)
        + (explore.max_users * b["category_user_time"]
           if explore.enabled and explore.half_life_s > 0 else 0)
        # and the category source's merged lists (operators/category_items.py; shared by
        # the user shards of a process since serve7, counted per shard as before) with
        # each list's items as rows of the shard's id space (CategoryItems.rows)
        + category_lists
        + (explore.max_categories * explore.retrieve_per_category * b["category_row"]
           if category_lists else 0)
    )
    channels = 2 if items.covis_any else 1
    covis_bytes = channels * covis.max_items * (
        1.5 * covis.max_neighbors * b["covis_neighbor"] + b["covis_loaded_row"])
    per_item_shard = (
        items.max_items * b["item"]
        + ("item" in kinds) * min(sh.hot_profiles, items.max_items) * b["hot_item_profile"]
        + ("item" in kinds) * QUEUED_WRITES * b["queued_profile_write"]
        + ("item" in kinds) * MAX_KEYS * b["profile_key"]
        + distinct["item"] * MAX_HASHES * b["profile_key"]
        + channels * covis.max_items * 1.5 * covis.max_neighbors * b["covis_row_neighbor"]
        # the last table's co-visitation arrays, kept when small (publish_arrays(keep=True))
        + channels * KEEP_ARRAYS_BYTES
        # the rows written since the last table, per channel (CoVisitation.publish_arrays)
        + channels * covis.max_items * b["covis_written_row"]
        + mf.max_items * (b["mf_row"] + b["mf_item_log"])
    )
    table_bytes = items.max_items * b["loaded_table_item"] + covis_bytes + category_lists
    if explore.enabled and explore.item_lift > 0:
        # category sampling's item_rate columns of each loaded table (two float64 per
        # item, ItemTable.feature_columns; shared by the process's user shards) and their
        # copy side by side, one per set of loaded tables (state.item_rows.table_columns)
        table_bytes += 2 * items.max_items * b["table_rate_item"]
    parts = {
        # plus the static item features the shards of a process share
        # (operators/point_in_time.py _SHARED_STATICS: values the shards' memos hold too,
        # counted again because a shard's memo may be cleared first)
        # and the item events' shared catalog entries and the static features by their
        # identity (operators/user_shard.py catalog_attrs, point_in_time.py _SHARED_BY_ATTRS)
        "user_shards": (sh.users * per_user_shard + MAX_STATIC_MEMO * b["static_memo_item"]
                        + MAX_CATALOG_ATTRS * b["catalog_attrs_entry"]
                        + MAX_STATIC_MEMO * b["shared_by_attrs_entry"]),
        # plus the .npy headers the process's table writers memoise (state/npz.py _HEADERS)
        "item_shards": (sh.items * per_item_shard + MAX_HEADERS * b["npy_header_entry"]
                        if items.enabled else 0.0),
        "serving_tables": sh.items * table_bytes if items.enabled else 0.0,
        # the builder's and the serving copy, whose live vectors are copied out once it
        # is read often (state.item_index.ItemIndex._stored: a uint64 label and dim float32)
        "index": (sh.items * mf.max_items * (2 * b["index_item"] + 8 + 4 * mf.dim)
                  if items.enabled else 0.0),
        # replaced versions kept for deferred impression features (operators.point_in_time):
        # each replaced one shard's table or the index; the user shards of a process
        # switch at the same batch boundaries, so they hold the same versions
        "retained_versions": (RETAINED_VERSIONS * max(table_bytes, sh.items * mf.max_items
                                                      * (b["index_item"] + 8 + 4 * mf.dim))
                              if items.enabled else 0.0),
        # plus the serving copy's static terms of distinct catalog attribute sets
        # (operators/linear_scorer.py ColumnScorer._attr_memo, one per process)
        "ranker": (config.ranker.max_waiting * b["waiting_example"]
                   + 3 * config.ranker.max_features * b["ranker_weight"]
                   + MAX_ATTR_MEMO * b["attr_memo_entry"]
                   if config.ranker.enabled else 0.0),
        "routing": 2 * sh.routing_cache * b["routing_cache_entry"],
    }
    parts_mb = {k: v * ALLOCATOR_OVERHEAD / 2**20 for k, v in parts.items()}
    return {"total_mb": sum(parts_mb.values()), "parts_mb": parts_mb}
