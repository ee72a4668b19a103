"""The snapshot store: versions, atomic writes, verification, refusal keeps the previous."""

from __future__ import annotations

import threading

import pytest

from state.snapshot_store import SnapshotError, SnapshotReader, SnapshotStore, _read_file


def test_versions_monotonic_across_restarts_and_pruned(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    versions = [store.write_bytes("ranker", "bin", b"x%d" % i, ts=1000 + i)["version"] for i in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    again = SnapshotStore(tmp_path / "snaps", keep=3)
    assert again.write_bytes("ranker", "bin", b"y", ts=2000)["version"] == 6
    files = sorted(p.name for p in (tmp_path / "snaps" / "ranker").glob("v*"))
    assert files == [f"v{v:010d}.{ext}" for v in (4, 5, 6) for ext in ("bin", "json")]
    latest = again.latest("ranker")
    assert latest["version"] == 6 and latest["ts"] == 2000 and latest["bytes"] == 1
    assert again.verified_path(latest).read_bytes() == b"y"


def test_pruning_deletes_only_the_old_versions_files(tmp_path) -> None:
    """A pruned version loses every ``v<version>.*`` file; files of kept versions, other
    names and manifests without a digit version stay and do not count as versions."""
    store = SnapshotStore(tmp_path / "snaps", keep=2)
    folder = tmp_path / "snaps" / "ranker"
    store.write_bytes("ranker", "bin", b"a", ts=1)
    strays = ["notes.txt", "v0000000001x.bin", ".v0000000001.bin.tmp-1", "vabc.json", "v.json",
              "w0000000001.json"]
    for name in [*strays, "v0000000001.sidecar", "v0000000001."]:
        (folder / name).write_bytes(b"?")
    assert store.next_version("ranker") == 2
    for ts in (2, 3):
        store.write_bytes("ranker", "bin", b"b", ts=ts)
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([*strays, "LATEST", *(f"v{v:010d}.{ext}" for v in (2, 3)
                                                 for ext in ("bin", "json"))])
    assert [m["version"] for m in store.manifests("ranker")] == [3, 2]
    assert SnapshotStore(tmp_path / "empty").next_version("ranker") == 1


def test_tampered_and_truncated_and_outside_refused(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "s")
    m1 = store.write_bytes("model", "bin", b"first version", ts=1)
    m2 = store.write_bytes("model", "bin", b"second version", ts=2)
    reader = SnapshotReader(store, "model", lambda p: p.read_bytes())
    assert reader.offer(m1) and reader.current == b"first version"
    path = store.verified_path(m2)
    path.write_bytes(b"second vers")  # truncated
    with pytest.raises(SnapshotError, match=r"11 bytes, the manifest says 14 \(truncated\)"):
        store.verified_path(m2)
    assert not reader.offer(m2)
    assert reader.current == b"first version" and reader.version == 1 and reader.refused == 1
    assert "truncated" in reader.last_error
    path.write_bytes(b"second versio!")  # same size, altered
    with pytest.raises(SnapshotError, match=r"sha256 .* does not match .* \(altered\)"):
        store.verified_path(m2)
    outside = tmp_path / "evil.bin"
    outside.write_bytes(b"evil")
    forged = dict(m2, version=9, path="../evil.bin")
    with pytest.raises(SnapshotError, match="outside the snapshot store"):
        store.verified_path(forged)
    assert not reader.offer(forged) and reader.version == 1
    with pytest.raises(SnapshotError, match="no such snapshot"):
        store.verified_path(dict(m2, path="model/v0000000099.bin"))


def test_reader_takes_only_newer_versions(tmp_path) -> None:
    store = SnapshotStore(tmp_path)
    m1 = store.write_bytes("k", "bin", b"1", ts=1)
    m2 = store.write_bytes("k", "bin", b"2", ts=2)
    reader = SnapshotReader(store, "k", lambda p: p.read_bytes())
    assert reader.offer(m2) and not reader.offer(m1) and reader.current == b"2"
    assert not reader.offer(dict(m2, kind="other"))


def test_a_reader_at_the_newest_version_is_offered_nothing(tmp_path) -> None:
    """Issue 18 point 1 (batch17): the usual poll (nothing newer) offers no manifest and
    lists no older ones; a newer LATEST beyond ``max_ts`` still leads to the older
    versions, newest first (``refresh`` takes the first that is newer and verifies)."""
    store = SnapshotStore(tmp_path)
    for n in (1, 2):
        store.write_bytes("k", "bin", b"%d" % n, ts=n)
    reader = SnapshotReader(store, "k", lambda p: p.read_bytes())
    assert reader.refresh() and reader.version == 2
    assert list(reader.candidates()) == [] and not reader.refresh()
    store.write_bytes("k", "bin", b"3", ts=3)
    store.write_bytes("k", "bin", b"4", ts=4)
    assert [m["version"] for m in reader.candidates(max_ts=3)] == [3, 2, 1]  # LATEST too new
    assert [m["version"] for m in reader.candidates()] == [4, 3, 2, 1]
    assert reader.refresh(max_ts=3) and reader.current == b"3"


def test_latest_is_parsed_once_per_content(tmp_path) -> None:
    """An unchanged LATEST gives the manifest parsed before; a rewritten one is read anew;
    a kind never written has none (no exception per poll)."""
    store = SnapshotStore(tmp_path)
    assert store.latest("k") is None
    m1 = store.write_bytes("k", "bin", b"1", ts=1)
    first = store.latest("k")
    assert first == m1 and store.latest("k") is first
    m2 = store.write_bytes("k", "bin", b"2", ts=2)
    assert store.latest("k") == m2 and SnapshotStore(tmp_path).latest("k") == m2


def test_read_file_reads_the_whole_file(tmp_path) -> None:
    """``_read_file`` (LATEST at every poll) gives ``read_bytes`` also past one 64 KiB read."""
    for size in (0, 338, 1 << 16, 3 * (1 << 16) + 5):
        path = tmp_path / f"f{size}"
        path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        assert _read_file(str(path)) == path.read_bytes()
    with pytest.raises(FileNotFoundError):
        _read_file(str(tmp_path / "missing"))


def test_readers_never_see_a_partial_file(tmp_path) -> None:
    store = SnapshotStore(tmp_path, keep=50)
    payloads = [bytes([i % 251]) * (200_000 + i) for i in range(40)]
    failures: list[str] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            latest = store.latest("big")
            if latest is None:
                continue
            try:
                data = store.verified_path(latest).read_bytes()
            except SnapshotError as err:
                failures.append(str(err))
                continue
            if data != payloads[latest["version"] - 1]:
                failures.append(f"v{latest['version']} content differs")

    threads = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in threads:
        t.start()
    for p in payloads:
        store.write_bytes("big", "bin", p, ts=0)
    done.set()
    for t in threads:
        t.join()
    assert failures == []


class _Loaded:
    """A weakly referable loaded snapshot (bytes are not)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def test_readers_of_a_store_share_each_loaded_version(tmp_path) -> None:
    """One load per version and process: a second reader (another shard) gets the same
    object from the cache, as long as a reader holds it."""
    store = SnapshotStore(tmp_path)
    store.write_bytes("k", "bin", b"v1", ts=1)
    loads: list[str] = []

    def loader(path) -> _Loaded:
        loads.append(path.name)
        return _Loaded(path.read_bytes())

    a, b = SnapshotReader(store, "k", loader), SnapshotReader(store, "k", loader)
    assert a.refresh() and b.refresh()
    assert a.current is b.current and loads == ["v0000000001.bin"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_manifest", "other_kind"])
def test_damaged_latest_is_refused_and_the_newest_verified_version_served(
        tmp_path, caplog, damage: str) -> None:
    """Issue 19 point 5: a damaged LATEST used to raise in every reader (the flow died);
    now it is refused with one error and the newest version that verifies is served."""
    store = SnapshotStore(tmp_path)
    for n in (1, 2, 3):
        store.write_bytes("ranker", "bin", b"model %d" % n, ts=n)
    latest = tmp_path / "ranker" / "LATEST"
    body = latest.read_bytes()
    latest.write_bytes({"truncated": body[: len(body) // 2], "empty": b"", "not_a_manifest": b"[3]",
                        "other_kind": body.replace(b'"ranker"', b'"index"')}[damage])
    (tmp_path / "ranker" / "v0000000003.bin").write_bytes(b"model X")  # v3 altered too
    with caplog.at_level("ERROR", logger="state.snapshot_store"):
        reader = SnapshotReader(store, "ranker", lambda p: p.read_bytes())
        assert reader.refresh()
        assert (reader.version, reader.current) == (2, b"model 2")
        assert not SnapshotReader(store, "ranker", lambda p: p.read_bytes()).refresh(max_ts=0)
    refused = [r.getMessage() for r in caplog.records if "LATEST manifest refused" in r.getMessage()]
    assert len(refused) == 1, refused  # once per file state and process
    assert store.next_version("ranker") == 4
    store.write_bytes("ranker", "bin", b"model 4", ts=4)  # the next write repairs LATEST
    assert reader.refresh() and reader.current == b"model 4"


def test_a_write_fsyncs_the_data_its_manifest_and_the_directory_not_latest(
        tmp_path, monkeypatch) -> None:
    """Three fsyncs per version (data file, version manifest, directory): a LATEST torn by
    a crash is refused and the fsynced version manifest stands in for it (test above),
    so LATEST is renamed into place without its own fsync."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    store = SnapshotStore(tmp_path)
    store.write_bytes("items-i000", "npz", b"table 1", ts=1)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.write_bytes("items-i000", "npz", b"table 2", ts=2)
    assert [s.split(".tmp-")[0] for s in synced] == [
        ".v0000000002.npz", ".v0000000002.json", "items-i000"]
    reader = SnapshotReader(store, "items-i000", lambda p: p.read_bytes())
    assert reader.refresh() and (reader.version, reader.current) == (2, b"table 2")


def test_a_store_without_fsync_writes_the_same_versions_and_syncs_nothing(
        tmp_path, monkeypatch) -> None:
    """``durable=False`` (snapshots.fsync = false, streamrec eval): no fsync at all, and
    the same files, manifests and pruning as a durable store."""
    import os

    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    fast = SnapshotStore(tmp_path / "fast", keep=2, durable=False)
    for n in range(4):
        fast.write_bytes("items-i000", "npz", b"table %d" % n, ts=n)
    assert synced == []
    assert sorted(p.name for p in (tmp_path / "fast" / "items-i000").iterdir()) == [
        "LATEST", "v0000000003.json", "v0000000003.npz", "v0000000004.json", "v0000000004.npz"]
    reader = SnapshotReader(fast, "items-i000", lambda p: p.read_bytes())
    assert reader.refresh() and (reader.version, reader.current) == (4, b"table 3")
    durable = SnapshotStore(tmp_path / "slow")
    durable.write_bytes("items-i000", "npz", b"table", ts=1)
    assert len(synced) == 3
    import pickle
    assert pickle.loads(pickle.dumps(fast)).durable is False


def test_background_write_returns_before_the_fsyncs_and_settles_in_order(tmp_path, monkeypatch) -> None:
    """A live flow's stages write through a background store: ``write`` returns once the
    file is written and hashed; the slow fsyncs and the renames that make it visible run
    on the writer thread, in write order; ``flush`` waits for them."""
    import os
    import threading

    real_fsync = os.fsync
    gate, synced = threading.Event(), []

    def held_fsync(fd: int) -> None:  # held until the writes returned (10 s at most)
        gate.wait(10.0)
        real_fsync(fd)
        synced.append(fd)

    store = SnapshotStore(tmp_path, keep=10, background=True)
    monkeypatch.setattr(os, "fsync", held_fsync)
    manifests = [store.write_bytes("items-i000", "bin", b"table@%d" % i, ts=1_000 * i)
                 for i in range(1, 4)]
    assert not synced, "the background writes waited for an fsync"
    gate.set()
    assert [m["version"] for m in manifests] == [1, 2, 3]
    # a reader in this process waits for the versions of its kind still settling
    assert store.latest("items-i000") == manifests[-1]
    store.flush()
    assert store.latest("items-i000") == manifests[-1]
    for i, manifest in enumerate(manifests, 1):
        assert store.verified_path(manifest).read_bytes() == b"table@%d" % i
    # a resumed store (unpickled from flow state) keeps writing in the background, after them
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again.background and again.write_bytes("items-i000", "bin", b"x", ts=9)["version"] == 4
    again.flush()


def test_readers_in_the_process_see_background_writes_as_if_written_in_place(
        tmp_path, monkeypatch) -> None:
    """Issue 18 point 4: the flow settles every version (fsyncs, renames, ``LATEST``,
    pruning) off the batch path, replays included: a reader in the process, through any
    store of the same root, waits for the versions of its kind still settling, so a
    replay's reads by event time meet the versions an in-place write would show."""
    import os
    import threading

    real_fsync = os.fsync
    gate, synced = threading.Event(), []

    def held_fsync(fd: int) -> None:  # held until the reader asks (10 s at most)
        gate.wait(10.0)
        real_fsync(fd)
        synced.append(fd)

    writer = SnapshotStore(tmp_path, keep=2, background=True)
    reader_store = SnapshotStore(tmp_path, keep=2)  # another stage's instance
    reader = SnapshotReader(reader_store, "items-i000", lambda p: p.read_bytes())
    monkeypatch.setattr(os, "fsync", held_fsync)
    for i in range(1, 5):
        gate.clear()
        done = len(synced)
        manifest = writer.write_bytes("items-i000", "bin", b"v%d" % i, ts=i)
        assert len(synced) == done  # the fsyncs are not waited for here
        threading.Timer(0.05, gate.set).start()  # they finish while the reader waits
        assert reader.refresh() and reader.current == b"v%d" % i
        assert reader_store.verified_path(manifest).read_bytes() == b"v%d" % i
        assert [m["version"] for m in reader_store.manifests("items-i000")] == \
            list(range(i, max(0, i - 2), -1))  # pruned to keep=2 too
        writer.flush()  # no fsync of this version left to meet the next one's closed gate
    assert writer.write_bytes("ranker", "bin", b"r", ts=1)["version"] == 1  # other kinds: no wait
    writer.flush()


def test_write_file_hashes_as_written_and_gives_writes_manifest(tmp_path) -> None:
    """``write_file`` hashes the bytes as the writer gives them (no read back): its
    manifests (sha256, bytes) equal ``write``'s for the same content, also when the
    writer seeks (``np.savez``'s zip writer), and the files verify."""
    import numpy as np

    parts = [b"head", memoryview(np.arange(1_000, dtype=np.float64)).cast("B"), b"", b"tail"]
    content = b"".join(bytes(p) for p in parts)
    by_path = SnapshotStore(tmp_path / "a").write("t", "bin", lambda p: p.write_bytes(content), 5)
    store = SnapshotStore(tmp_path / "b")
    streamed = store.write_file("t", "bin", lambda f: f.writelines(parts), 5)
    one_write = store.write_file("t", "bin", lambda f: f.write(content), 6)

    def seeking(f) -> None:
        f.write(b"x" * len(content))
        f.seek(0)
        f.write(content)

    sought = store.write_file("t", "bin", seeking, 7)
    for m in (streamed, one_write, sought):
        assert (m["sha256"], m["bytes"]) == (by_path["sha256"], by_path["bytes"])
        assert store.verified_path(m).read_bytes() == content
    arrays = {"a": np.arange(5), "b": np.array(["x", "yz"])}
    saved = store.write_file("npz", "npz", lambda f: np.savez(f, **arrays), 8)
    with np.load(store.verified_path(saved)) as z:
        assert z["a"].tolist() == [0, 1, 2, 3, 4] and z["b"].tolist() == ["x", "yz"]
