"""Convert public datasets into streamrec event logs (JSONL, time-ordered).

* MovieLens: ``u.data`` (tab), ``ratings.dat`` (``::``) or ``ratings.csv`` (header),
  detected from the content. Each rating becomes ``feedback`` with action
  ``rating`` and the rating as ``value`` (seconds -> ms). With ``with_requests``, a
  ``request`` for the user is written just before every positive (rating >= 4),
  same ts, so the prequential protocol can ask for recommendations before the
  system learns from the rating. Item events (title, genres as ``category``) are
  written first when ``u.item`` / ``movies.dat`` / ``movies.csv`` lies beside the file.
* Open Bandit Dataset: each CSV row becomes an ``impression`` (id ``obd-<row>``,
  position 0-based = OBD position - 1, propensity in context) and, for clicked rows,
  a ``click`` feedback 1 s later. The dataset has no user id: the user id is
  ``obd-`` + the first 16 hex digits of BLAKE2b over the four hashed user features
  joined by ``|`` (users sharing all four features are one user).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from events.logfile import open_log_for_write

Event = dict[str, Any]


def _movielens_rows(path: Path) -> Iterator[tuple[str, str, float, int]]:
    """(user, item, rating, unix seconds) in file order, any of the three formats."""
    with path.open("r", encoding="latin-1") as f:
        first = f.readline()
        f.seek(0)
        if "::" in first:
            for line in f:
                if line.strip():
                    u, i, r, t = line.strip().split("::")[:4]
                    yield u, i, float(r), int(float(t))
        elif "\t" in first:
            for line in f:
                if line.strip():
                    u, i, r, t = line.strip().split("\t")[:4]
                    yield u, i, float(r), int(float(t))
        else:
            reader = csv.reader(f)
            header = next(reader)
            if not header or not header[0].lower().startswith("user"):
                raise ValueError(f"{path}: unrecognised MovieLens format (first line {first!r})")
            for row in reader:
                if row:
                    yield row[0], row[1], float(row[2]), int(float(row[3]))


def _movielens_items(ratings: Path) -> list[tuple[str, dict[str, Any]]]:
    """(item id, attrs) from the item file beside the ratings, if any."""
    folder = ratings.parent
    genres_100k: list[str] = []
    if (folder / "u.genre").exists():
        for line in (folder / "u.genre").read_text(encoding="latin-1").splitlines():
            if "|" in line:
                genres_100k.append(line.split("|")[0])
    items: list[tuple[str, dict[str, Any]]] = []
    if (folder / "u.item").exists():
        for line in (folder / "u.item").read_text(encoding="latin-1").splitlines():
            parts = line.split("|")
            if len(parts) < 6:
                continue
            flags = parts[5:]
            genres = [g for g, flag in zip(genres_100k, flags, strict=False) if flag == "1"]
            items.append((parts[0], {"title": parts[1], "genres": genres,
                                     "category": genres[0] if genres else "unknown"}))
    elif (folder / "movies.dat").exists():
        for line in (folder / "movies.dat").read_text(encoding="latin-1").splitlines():
            parts = line.split("::")
            if len(parts) >= 3:
                genres = parts[2].split("|")
                items.append((parts[0], {"title": parts[1], "genres": genres, "category": genres[0]}))
    elif (folder / "movies.csv").exists():
        with (folder / "movies.csv").open(encoding="utf-8") as f:
            for row in csv.DictReader(f):
                genres = row.get("genres", "").split("|")
                items.append((row["movieId"], {"title": row.get("title", ""), "genres": genres,
                                               "category": genres[0] if genres else "unknown"}))
    return items


def movielens_events(path: str | Path, with_requests: bool = False,
                     positive_threshold: float = 4.0) -> list[Event]:
    """Time-ordered events of a MovieLens ratings file (stable on ts ties)."""
    path = Path(path)
    rows = sorted(_movielens_rows(path), key=lambda r: r[3])
    events: list[Event] = []
    if rows:
        start = rows[0][3] * 1000
        for item_id, attrs in _movielens_items(path):
            events.append({"type": "item", "ts": start, "item_id": item_id, "attrs": attrs})
    for n, (user, item, rating, seconds) in enumerate(rows):
        ts = seconds * 1000
        if with_requests and rating >= positive_threshold:
            events.append({"type": "request", "ts": ts, "request_id": f"ml-r{n}", "user_id": user,
                           "k": 10, "context": {"eval_item": item}})
        events.append({"type": "feedback", "ts": ts, "user_id": user, "item_id": item,
                       "action": "rating", "value": rating})
    return events


def _obd_ts_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def obd_user_id(features: list[str]) -> str:
    """Derived user id of an OBD row: BLAKE2b over the hashed user features."""
    digest = hashlib.blake2b("|".join(features).encode(), digest_size=8).hexdigest()
    return f"obd-{digest}"


def obd_events(path: str | Path, click_delay_ms: int = 1_000) -> list[Event]:
    """Impressions (+ click feedback for clicked rows) of an OBD CSV, time-ordered."""
    events: list[tuple[int, int, Event]] = []
    with Path(path).open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for n, row in enumerate(reader):
            row_id = row.get("") or str(n)
            ts = _obd_ts_ms(row["timestamp"])
            user = obd_user_id([row[f"user_feature_{k}"] for k in range(4)])
            imp_id = f"obd-{row_id}"
            item = row["item_id"]
            events.append((ts, 2 * n, {
                "type": "impression", "ts": ts, "impression_id": imp_id, "user_id": user,
                "item_id": item, "position": int(row["position"]) - 1,
                "context": {"propensity": float(row["propensity_score"])},
            }))
            if row["click"] == "1":
                events.append((ts + click_delay_ms, 2 * n + 1, {
                    "type": "feedback", "ts": ts + click_delay_ms, "user_id": user, "item_id": item,
                    "action": "click", "impression_id": imp_id, "value": 1.0,
                }))
    events.sort(key=lambda e: (e[0], e[1]))
    return [e for _, _, e in events]


def write_events(events: list[Event], out: str | Path,
                 on_batch: Callable[[int], None] | None = None) -> int:
    """Write events as JSONL (gzip when ``out`` ends with .gz); returns the count.
    ``on_batch(n)`` is called after every 10,000 events written (progress)."""
    with open_log_for_write(out) as f:
        for start in range(0, len(events), 10_000):
            chunk = events[start:start + 10_000]
            f.write(b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in chunk))
            if on_batch is not None:
                on_batch(len(chunk))
    return len(events)
