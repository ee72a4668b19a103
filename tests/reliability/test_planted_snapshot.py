"""No code from the snapshot store (issue 19, point 3).

Whoever can write the snapshot directory can also write a manifest with the right
sha256, so verification only detects damage. Every snapshot kind is therefore read as
data: ``.npz`` with ``allow_pickle=False`` (rankers through ``models.ranker_io``, item
tables, the index) and JSON manifests. Here a pickle whose unpickling would create a
file is planted as the newest version of each kind, with a manifest that verifies:
it is refused, the reader keeps (or falls back to) the last good version, and the
file is never created.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import orjson
import pytest

from flows.config import load_config
from models.ranker_io import save_ranker
from models.rankers import make_ranker
from operators.snapshot_views import SnapshotViews
from operators.trainer import load_ranker
from state.covisitation import CoVisConfig, CoVisitation
from state.item_index import IndexBuilder, IndexConfig, load_frozen
from state.item_table import ItemTable
from state.snapshot_store import SnapshotReader, SnapshotStore

T0 = 1_767_225_600_000


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _plain_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def _pickle_in_npz(marker: Path) -> bytes:
    """A ``.npz`` whose member is an object array holding the payload (np.load would
    unpickle it with ``allow_pickle=True``)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, header=np.asarray([Payload(marker)], dtype=object))
    return buf.getvalue()


def _good_ranker(path: Path) -> None:
    ranker = make_ranker("lr")
    ranker.learn({"example_id": "e", "ts": T0, "user_id": "u", "item_id": "i", "label": 1,
                  "weight": 1.0})
    save_ranker(ranker, path, frozen=True)


def _good_table(path: Path) -> None:
    ItemTable("i000", T0, CoVisitation(CoVisConfig()), {"a": 1.0}).save(path)


def _good_index(path: Path) -> None:
    builder = IndexBuilder(IndexConfig(dim=4))
    builder.apply(["a", "b"], np.eye(4, dtype=np.float32)[:2], [])
    builder.index.save(path)


KINDS = {"ranker": (load_ranker, _good_ranker), "items-i000": (ItemTable.load, _good_table),
         "index": (load_frozen, _good_index)}


@pytest.mark.parametrize("plant", [_plain_pickle, _pickle_in_npz])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_planted_pickle_with_a_valid_manifest_is_refused_and_never_run(
        tmp_path: Path, kind: str, plant) -> None:
    loader, good = KINDS[kind]
    store = SnapshotStore(tmp_path / "store")
    store.write(kind, "npz", good, T0)
    marker = tmp_path / "code-ran"
    for ext in ("pkl", "npz"):  # whatever the name, the manifest verifies (sha256 matches)
        planted = store.write_bytes(kind, ext, plant(marker), T0 + 1)
        assert store.verified_path(planted)
        fresh = SnapshotReader(store, kind, loader)  # nothing loaded: tries LATEST, then older
        assert fresh.refresh() and fresh.version == 1, fresh.last_error
        assert fresh.refused >= 1 and fresh.last_error
        assert not marker.exists(), "unpickling the planted file ran its code"


def test_serving_skips_a_planted_ranker(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "store")
    store.write("ranker", "npz", _good_ranker, T0)
    marker = tmp_path / "code-ran"
    store.write_bytes("ranker", "pkl", _plain_pickle(marker), T0 + 1)
    views = SnapshotViews(store, [], poll_ms=0)
    views.poll()
    assert views.ranker.version == 1 and views.ranker.current is not None
    assert not marker.exists()


# -- signed manifests (snapshots.hmac_key) ------------------------------------------------


def test_with_a_key_only_signed_versions_load(tmp_path: Path) -> None:
    """Data can still be a wrong model: with ``snapshots.hmac_key`` only a writer holding
    the key can publish. A valid ranker file with a matching sha256 manifest, written
    without the key (or with a forged signature), is refused."""
    key = "s3cret-key"
    signed = SnapshotStore(tmp_path / "store", hmac_key=key)
    good = signed.write("ranker", "npz", _good_ranker, T0)
    assert len(good["hmac"]) == 64
    planter = SnapshotStore(tmp_path / "store")  # same directory, no key
    planter.write("ranker", "npz", _good_ranker, T0 + 1)
    reader = SnapshotReader(signed, "ranker", load_ranker)
    assert reader.refresh() and reader.version == 1
    assert "not signed" in (reader.last_error or "")
    forged = planter.write("ranker", "npz", _good_ranker, T0 + 2)
    forged["hmac"] = "0" * 64
    (signed.root / "ranker" / "LATEST").write_bytes(orjson.dumps(forged))
    assert not reader.refresh() and reader.version == 1
    assert "signature does not match" in (reader.last_error or "")
    assert signed.write("ranker", "npz", _good_ranker, T0 + 3)["version"] == 4
    assert reader.refresh() and reader.version == 4
    # readers without a key still read signed stores; recovery keeps the key
    assert SnapshotReader(planter, "ranker", load_ranker).refresh()
    resumed = pickle.loads(pickle.dumps(reader))
    assert resumed.version == 4 and resumed.store.verified_path(good)


def test_the_key_comes_from_the_config_and_stays_out_of_reports(tmp_path: Path) -> None:
    config = load_config({"snapshots": {"dir": str(tmp_path), "hmac_key": "k"}})
    store = config.snapshot_store()
    assert "hmac" in store.write_bytes("x", "bin", b"1", T0)
    assert config.redacted()["snapshots"]["hmac_key"] == "***"
    assert load_config({}).redacted()["snapshots"]["hmac_key"] == ""
