"""A directory of versioned, immutable snapshot files, each announced by a manifest.

Layout: ``<root>/<kind>/v<version:010d>.<ext>`` with the manifest beside it as
``v<version:010d>.json`` and ``<root>/<kind>/LATEST`` naming the newest manifest.
Every file is written to a temporary name in the same directory, flushed and
fsynced (the data file and its version manifest; ``LATEST`` only flushed, see
``write``), then renamed into place, so a reader never sees a partial file. Versions
of a kind increase by one per write (strictly monotonic, also across restarts).

Readers verify before loading: the manifest's path must resolve inside this store's
root and the file's sha256 must match; anything else raises ``SnapshotError`` with
the reason. ``SnapshotReader`` keeps serving its previous version when a new one is
refused. With an ``hmac_key`` every manifest carries ``hmac`` (HMAC-SHA256 of the
manifest's other fields, keys sorted) and readers refuse a manifest whose signature is
missing or wrong: a sha256 beside the file only detects damage, since whoever can
write a file can write its manifest; the signature needs the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

import orjson

log = logging.getLogger(__name__)

T = TypeVar("T")
Manifest = dict[str, Any]
"""{kind, version, path (relative to the store root), sha256, bytes, ts (event time, ms),
created_ms (wall time), counts{}}."""


class SnapshotError(Exception):
    """A snapshot that must not be loaded (outside the store, missing, or altered)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class DigestingFile:
    """A binary file being written whose sha256 and size follow the bytes given to
    ``write``/``writelines``, so a written snapshot need not be read back to be hashed.
    Any other use of the file (``seek``, ``tell``: e.g. ``np.savez``'s zip writer) is
    passed through and clears ``sequential``: the caller then hashes the file itself."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._digest = hashlib.sha256()
        self.size = 0
        """Bytes written so far."""
        self.sequential = True
        """False once the file was used otherwise than by appending writes."""

    def write(self, data: Any) -> int:
        self._digest.update(data)
        n = self._file.write(data)
        self.size += n
        return n

    def writelines(self, parts: Iterable[Any]) -> None:
        for part in parts:
            self.write(part)

    def hexdigest(self) -> str:
        """Hex sha256 of the bytes written so far."""
        return self._digest.hexdigest()

    def __getattr__(self, name: str) -> Any:
        self.sequential = False
        return getattr(self._file, name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to a temporary name and rename it over ``path``; ``durable``
    fsyncs the file before the rename (else a crash may leave it empty or torn)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with tmp.open("wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_file(name: str) -> bytes:
    """The whole content of the file ``name``: ``open(name, "rb").read()`` without a file
    object (``os.read`` until end of file; ~2 us instead of ~5.5 us for a manifest, read by
    every reader of every shard at every poll)."""
    fd = os.open(name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _manifest_names(folder: Path) -> list[tuple[int, str]]:
    """(version, file name) of each version manifest ``v<digits>.json`` in ``folder``, in
    directory order (none when it is missing): ``folder.glob("v*.json")`` with a digit
    stem, from one ``os.listdir`` without pattern matching or a path per entry."""
    return _manifests_among(_listdir(folder))


def _listdir(folder: Path) -> list[str]:
    """``os.listdir(folder)``; none when the folder is missing."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _manifests_among(names: list[str]) -> list[tuple[int, str]]:
    """(version, file name) of each version manifest ``v<digits>.json`` among ``names``."""
    return [(int(name[1:-5]), name) for name in names
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit()]


def manifest_signature(manifest: Manifest, key: bytes) -> str:
    """Hex HMAC-SHA256 of every field of ``manifest`` but ``hmac`` (JSON, keys sorted)."""
    body = orjson.dumps({k: v for k, v in manifest.items() if k != "hmac"},
                        option=orjson.OPT_SORT_KEYS)
    return hmac.new(key, body, hashlib.sha256).hexdigest()


_SETTLING: dict[tuple[str, str], list[Future[None]]] = {}
"""(store root, kind) -> versions this process is settling in the background (``write``);
readers of the kind wait for them (``SnapshotStore._await_settled``)."""
_SETTLING_LOCK = threading.Lock()


class SnapshotStore:
    """Versioned immutable files under ``root``; keeps the newest ``keep`` versions per kind.

    ``hmac_key``: sign every manifest written and refuse manifests without a valid
    signature (None: unsigned).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = SnapshotStore(tmp.name, keep=2)
    >>> for ts in (1_000, 2_000, 3_000):
    ...     manifest = store.write_bytes("ranker", "bin", b"model@%d" % ts, ts=ts)
    >>> manifest["version"], manifest["path"], [m["version"] for m in store.manifests("ranker")]
    (3, 'ranker/v0000000003.bin', [3, 2])
    >>> store.verified_path(manifest).read_bytes()
    b'model@3000'
    >>> reader = SnapshotReader(store, "ranker", lambda path: path.read_bytes())
    >>> reader.refresh(max_ts=2_500), reader.version, reader.current
    (True, 2, b'model@2000')
    >>> tmp.cleanup()
    """

    def __init__(self, root: str | Path, keep: int = 5, hmac_key: str | bytes | None = None,
                 background: bool = False, durable: bool = True) -> None:
        self.root = Path(root).resolve()
        self.keep = keep
        self._key = hmac_key.encode() if isinstance(hmac_key, str) else hmac_key
        self.durable = durable
        """Fsync each version (file, manifest, directory) before it counts as written
        (~10 ms of I/O wait per version here). False only for stores nothing resumes
        from (``streamrec eval``): a crash may then leave a torn version, which readers
        refuse by its sha256."""
        self.background = background
        """``write`` returns once the file is written and hashed; making it durable and
        visible (fsyncs, renames, ``LATEST``) runs on this store's writer thread."""
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._latest_paths: dict[str, str] = {}
        """kind -> its ``LATEST`` file's path (read at every poll of every reader)."""
        self._latest_parsed: dict[str, tuple[bytes, Manifest]] = {}
        """kind -> the last valid ``LATEST`` content read and its manifest: an unchanged
        file (the usual poll) is not parsed again (callers must not modify manifests)."""

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "keep": self.keep, "hmac_key": self._key,
                "background": self.background, "durable": self.durable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["keep"], state.get("hmac_key"),
                      state.get("background", False), state.get("durable", True))

    def _kind_dir(self, kind: str) -> Path:
        if not kind or "/" in kind or kind.startswith("."):
            raise ValueError(f"invalid snapshot kind {kind!r}")
        return self.root / kind

    def next_version(self, kind: str) -> int:
        """One more than the highest version of ``kind`` present (1 for a new kind)."""
        latest = self._latest(kind)
        versions = [version for version, _ in _manifest_names(self._kind_dir(kind))]
        return max([latest["version"] if latest else 0, *versions]) + 1

    def write(self, kind: str, ext: str, writer: Callable[[Path], None], ts: int,
              counts: dict[str, Any] | None = None) -> Manifest:
        """Write a new version: ``writer(tmp_path)`` fills the file; returns its manifest.

        ``ts`` is the event time (ms) the snapshot reflects. With ``background`` the
        fsyncs and renames that make the version durable and visible to readers
        (``LATEST``) run on the writer thread, in write order, after this returns (they
        are what stalled a live flow's worker: ~50-100 ms of I/O wait per version on a
        busy disk for ~10 ms of CPU); ``flush`` waits for them.
        """
        folder, version, tmp = self._reserve(kind, ext)
        writer(tmp)
        return self._announce(kind, ext, folder, version, tmp, sha256_file(tmp),
                              tmp.stat().st_size, ts, counts)

    def write_file(self, kind: str, ext: str, fill: Callable[[BinaryIO], None], ts: int,
                   counts: dict[str, Any] | None = None) -> Manifest:
        """``write`` for a writer of an open binary file: ``fill(file)`` writes the
        version's content, hashed as it is written (a ``DigestingFile``: no read back,
        the same manifest)."""
        folder, version, tmp = self._reserve(kind, ext)
        with tmp.open("wb") as f:
            file = DigestingFile(f)
            fill(file)  # type: ignore[arg-type]
        sha256, size = ((file.hexdigest(), file.size) if file.sequential
                        else (sha256_file(tmp), tmp.stat().st_size))
        return self._announce(kind, ext, folder, version, tmp, sha256, size, ts, counts)

    def _reserve(self, kind: str, ext: str) -> tuple[Path, int, Path]:
        """(the kind's folder, the next version of ``kind``, its temporary file's path)."""
        folder = self._kind_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            version = max(self.next_version(kind), self._reserved.get(kind, 0) + 1)
            self._reserved[kind] = version
        return folder, version, folder / f".v{version:010d}.{ext}.tmp-{os.getpid()}"

    def _announce(self, kind: str, ext: str, folder: Path, version: int, tmp: Path,
                  sha256: str, size: int, ts: int, counts: dict[str, Any] | None) -> Manifest:
        """The manifest of a written temporary file (``size`` bytes, hex ``sha256``),
        its version settled (made durable and visible) here or on the writer thread."""
        name = f"v{version:010d}"
        final = folder / f"{name}.{ext}"
        manifest: Manifest = {
            "kind": kind,
            "version": version,
            "path": str(final.relative_to(self.root)),
            "sha256": sha256,
            "bytes": size,
            "ts": int(ts),
            "created_ms": int(time.time() * 1000),
            "counts": counts or {},
        }
        if self._key:
            manifest["hmac"] = manifest_signature(manifest, self._key)
        body = orjson.dumps(manifest)
        if not self.background:
            self._settle(folder, tmp, final, name, version, body)
            return manifest
        with self._lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="snapshot-write")
            self._pending = [f for f in self._pending if not f.done()]
            future = self._writer.submit(self._settle_logged, folder, tmp, final, name,
                                         version, body)
            self._pending.append(future)
        with _SETTLING_LOCK:
            key = (str(self.root), kind)
            _SETTLING[key] = [f for f in _SETTLING.get(key, ()) if not f.done()] + [future]
        return manifest

    def _settle(self, folder: Path, tmp: Path, final: Path, name: str, version: int,
                body: bytes) -> None:
        """Make a written version durable and visible: fsync, rename, its manifest,
        ``LATEST``, the directory; prune old versions."""
        durable = self.durable
        with self._settle_lock:
            if durable:
                with tmp.open("rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
            _atomic_write_bytes(folder / f"{name}.json", body, durable)
            # LATEST is a shortcut, not the record: a LATEST torn by a crash is refused
            # by ``latest`` and the newest version manifest (fsynced above) stands in,
            # so it needs no fsync of its own; the directory fsync makes the renames last.
            _atomic_write_bytes(folder / "LATEST", body, durable=False)
            if durable:
                _fsync_dir(folder)
            self._prune(folder, version)

    def _settle_logged(self, *args: Any) -> None:
        try:
            self._settle(*args)
        except Exception:  # the writer thread must go on; readers keep the previous version
            log.exception("snapshot %s/%s could not be made durable", args[0].name, args[3])

    def _await_settled(self, kind: str) -> None:
        """Wait until every version of ``kind`` that this process's stores (of this root)
        are settling in the background is visible: a reader in the process then sees
        what an in-place write would have shown it (a replay's reads stay deterministic)."""
        key = (str(self.root), kind)
        if key not in _SETTLING:
            return
        with _SETTLING_LOCK:
            futures = list(_SETTLING.get(key, ()))
        for future in futures:
            future.result()  # never raises: ``_settle_logged``
        with _SETTLING_LOCK:
            left = [f for f in _SETTLING.get(key, ()) if not f.done()]
            if left:
                _SETTLING[key] = left
            else:
                _SETTLING.pop(key, None)

    def flush(self) -> None:
        """Wait until every version written so far is durable and visible."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def write_bytes(self, kind: str, ext: str, data: bytes, ts: int,
                    counts: dict[str, Any] | None = None) -> Manifest:
        """Write ``data`` as a new version of ``kind``."""
        return self.write_file(kind, ext, lambda f: f.write(data), ts, counts)

    def _prune(self, folder: Path, newest: int) -> None:
        """Delete every file of the versions ``keep`` or more below ``newest`` (the
        ``v<version>.*`` files of each ``v<version>.json`` manifest)."""
        names = _listdir(folder)
        old = {name[:-5] for version, name in _manifests_among(names)
               if version <= newest - self.keep}
        if not old:
            return
        for name in names:  # one listing: files of old versions are never written again
            stem, dot, _ = name.partition(".")
            if dot and stem in old:
                (folder / name).unlink(missing_ok=True)

    _bad_latest: set[tuple[str, int, int]] = set()
    """LATEST files (path, size, mtime) already reported as damaged by this process."""

    def latest(self, kind: str) -> Manifest | None:
        """The newest manifest of ``kind``, or None. A damaged ``LATEST`` (truncated, not
        JSON, not a manifest of this kind) is refused like a damaged snapshot: an error
        is logged (once per file state and process) and the newest readable version
        manifest in the store stands in for it. Versions this process is still settling
        are waited for."""
        self._await_settled(kind)
        return self._latest(kind)

    def _latest(self, kind: str) -> Manifest | None:
        """``latest`` as the files are now (versions still settling not waited for)."""
        name = self._latest_paths.get(kind)
        if name is None:
            name = self._latest_paths[kind] = str(self._kind_dir(kind) / "LATEST")
        if not os.access(name, os.F_OK):  # a kind not written yet: no exception per poll
            return None
        try:
            data = _read_file(name)
        except FileNotFoundError:
            return None
        parsed = self._latest_parsed.get(kind)
        if parsed is not None and parsed[0] == data:
            return parsed[1]
        try:
            manifest = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            problem = f"not valid JSON ({len(data)} bytes: {err})"
        else:
            if (isinstance(manifest, dict) and manifest.get("kind") == kind
                    and isinstance(manifest.get("version"), int)
                    and isinstance(manifest.get("path"), str)
                    and isinstance(manifest.get("sha256"), str)):
                self._latest_parsed[kind] = (data, manifest)
                return manifest
            problem = f"not a manifest of kind {kind!r}: {data[:80]!r}"
        newest = self.manifests(kind)
        try:
            st = os.stat(name)
            seen = (name, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = (name, -1, -1)
        if seen not in self._bad_latest:
            if len(self._bad_latest) >= 256:
                self._bad_latest.clear()
            self._bad_latest.add(seen)
            log.error("snapshot %s: LATEST manifest refused (%s); using the newest version "
                      "manifest instead: %s", kind, problem,
                      f"v{newest[0]['version']}" if newest else "none")
        return newest[0] if newest else None

    def manifests(self, kind: str) -> list[Manifest]:
        """Every readable manifest of ``kind`` still in the store, newest version first."""
        self._await_settled(kind)
        out = []
        folder = self._kind_dir(kind)
        for _, name in _manifest_names(folder):
            try:
                manifest = orjson.loads((folder / name).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(manifest, dict) and isinstance(manifest.get("version"), int):
                out.append(manifest)
        return sorted(out, key=lambda m: m["version"], reverse=True)

    def check_signature(self, manifest: Manifest) -> None:
        """With an ``hmac_key``: raise ``SnapshotError`` unless the manifest is signed with it."""
        if not self._key:
            return
        rel = manifest.get("path")
        signature = manifest.get("hmac")
        if not isinstance(signature, str):
            raise SnapshotError(f"refused {rel!r}: the manifest is not signed "
                                "(snapshots.hmac_key is set)")
        if not hmac.compare_digest(signature, manifest_signature(manifest, self._key)):
            raise SnapshotError(f"refused {rel!r}: the manifest's signature does not match "
                                "(not written with this store's snapshots.hmac_key)")

    def verified_path(self, manifest: Manifest) -> Path:
        """The manifest's file, after checking it lies inside the store and its sha256 matches."""
        try:
            rel = manifest["path"]
            expected = manifest["sha256"]
        except (KeyError, TypeError):
            raise SnapshotError(f"not a snapshot manifest: {manifest!r}") from None
        if isinstance(manifest.get("kind"), str):
            self._await_settled(manifest["kind"])
        self.check_signature(manifest)
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise SnapshotError(f"refused {rel!r}: outside the snapshot store {self.root}")
        if not path.is_file():
            raise SnapshotError(f"refused {rel!r}: no such snapshot file in {self.root}")
        size, expected_size = path.stat().st_size, manifest.get("bytes")
        if isinstance(expected_size, int) and size != expected_size:
            raise SnapshotError(
                f"refused {rel!r}: {size} bytes, the manifest says {expected_size} "
                f"({'truncated' if size < expected_size else 'altered'})"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise SnapshotError(
                f"refused {rel!r}: sha256 {actual[:16]}... does not match the manifest's "
                f"{str(expected)[:16]}... (altered)"
            )
        return path


class SnapshotReader(Generic[T]):
    """Holds the newest verified snapshot of one kind, loaded by ``loader(path)``.

    ``offer(manifest)`` loads a newer version if it verifies; on any failure the
    previous version stays current and the error is kept in ``last_error`` (logged
    once per refused file and process, not at every poll). ``refresh`` takes the
    newest version in the store that verifies: when LATEST is refused, the one before
    it (so a new process, with nothing loaded yet, still serves).
    Loaded objects are shared by every reader of the same store in a process
    (cache keyed by sha256), and are never mutated by readers. The cache holds them
    weakly: a version stays loaded while some reader has it current, so a process holds
    one copy of each version in use and never the versions its readers moved past.
    Pickles as (store, kind, loader, current manifest) and reloads that version on
    unpickle, so flow state holding a reader resumes serving what it served (``loader``
    must pickle: a module-level function).
    """

    _cache: weakref.WeakValueDictionary[tuple[str, str, str], Any] = (
        weakref.WeakValueDictionary())
    _cache_lock = threading.Lock()
    _refusals: set[tuple[Any, ...]] = set()
    """Refused (store, kind, manifest, file size and mtime): not verified or logged again by
    any reader of the process until the file changes."""

    def __init__(self, store: SnapshotStore, kind: str, loader: Callable[[Path], T]) -> None:
        self.store = store
        self.kind = kind
        self.loader = loader
        self.current: T | None = None
        self.manifest: Manifest | None = None
        self.refused = 0
        self.last_error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "kind": self.kind, "loader": self.loader,
                "manifest": self.manifest, "refused": self.refused}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"], state["kind"], state["loader"])
        self.refused = state["refused"]
        if state["manifest"] is not None:
            self.offer(state["manifest"])

    @property
    def version(self) -> int | None:
        return self.manifest["version"] if self.manifest else None

    def _refusal_key(self, manifest: Manifest) -> tuple[Any, ...]:
        """Identifies a manifest and the file state it was refused for."""
        try:
            st = (self.store.root / manifest["path"]).stat()
            stat: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except (OSError, KeyError, TypeError):
            stat = None
        return (str(self.store.root), self.kind, manifest.get("version"), manifest.get("sha256"),
                manifest.get("path"), stat)

    def offer(self, manifest: Manifest) -> bool:
        """Load ``manifest`` if it is newer and verifies; True when it became current."""
        obj = self.prepare(manifest)
        if obj is None:
            return False
        self.install(manifest, obj)
        return True

    def prepare(self, manifest: Manifest, newer_than: int | None = None) -> T | None:
        """Verify and load ``manifest`` without making it current (None when it is not
        newer than the current version and ``newer_than``, or is refused). Only reads
        this reader's state, so another thread may prepare while the owner serves;
        ``install`` then makes the result current."""
        if manifest.get("kind") != self.kind:
            return None
        floor = max(self.version or 0, newer_than or 0)
        if manifest.get("version", 0) <= floor:
            return None
        refusal = self._refusal_key(manifest)
        with self._cache_lock:
            if refusal in self._refusals:
                return None  # refused before and the file has not changed since
        try:
            key = (str(self.store.root), self.kind, manifest["sha256"])
            with self._cache_lock:
                obj = self._cache.get(key)
            if obj is None:
                obj = self.loader(self.store.verified_path(manifest))
                with self._cache_lock, contextlib.suppress(TypeError):
                    self._cache[key] = obj  # TypeError: not weakly referable, not shared
            else:  # the content is a verified version's; the manifest must be genuine too
                self.store.check_signature(manifest)
        except (SnapshotError, KeyError, OSError, ValueError, EOFError) as err:
            self.refused += 1
            self.last_error = str(err)
            with self._cache_lock:
                if len(self._refusals) >= 256:
                    self._refusals.clear()
                self._refusals.add(refusal)
            keeping = (f"keeping v{self.version}" if self.version is not None
                       else "nothing loaded yet, trying older versions")
            log.error("snapshot %s v%s refused, %s: %s", self.kind, manifest.get("version"),
                      keeping, err)
            return None
        return obj

    def install(self, manifest: Manifest, obj: T) -> None:
        """Make a prepared (verified, loaded) version current."""
        self.current = obj
        self.manifest = manifest

    def candidates(self, max_ts: int | None = None) -> Iterator[Manifest]:
        """Manifests worth offering, best first: LATEST, then the older versions still in
        the store that are newer than the current one, newest first (consumed lazily:
        the older ones are only listed when LATEST was not taken). With ``max_ts``
        (event time, ms), only versions that reflect no event after it."""
        latest = self.store.latest(self.kind)
        if latest is None:
            return
        newest = latest.get("version", 0)
        if self.manifest is not None and newest <= self.manifest["version"]:
            return  # nothing newer than the current version (the usual poll): no offers
        if max_ts is None or latest.get("ts", 0) <= max_ts:
            yield latest
        yield from (m for m in self.store.manifests(self.kind)
                    if m["version"] < newest and (max_ts is None or m.get("ts", 0) <= max_ts))

    def refresh(self, max_ts: int | None = None,
                installed: dict[str, tuple[Manifest, Any]] | None = None) -> bool:
        """Load the newest version of this kind in the store that verifies (and, with
        ``max_ts``, whose event time is at most ``max_ts`` ms), if newer than the
        current one (LATEST first; when it is refused or too new, the versions before
        it); True when a version became current.

        ``installed`` (kind -> (manifest, object)), shared by readers of this store in
        the process: a version another of them installed from the same manifest object
        (the store's LATEST read once, met by every shard of a batch) is installed as
        its object without ``prepare``'s refusal check, cache lookup and signature
        check again (the checks that manifest passed; the object ``prepare`` would find
        in the cache, where it stays while held there); what this reader installs is
        recorded there when the cache shares it (weakly referable)."""
        for manifest in self.candidates(max_ts):
            last = installed.get(self.kind) if installed is not None else None
            if (last is not None and last[0] is manifest
                    and manifest["version"] > (self.version or 0)):
                self.install(manifest, last[1])
                return True
            if self.offer(manifest):
                if installed is not None and hasattr(type(self.current), "__weakref__"):
                    installed[self.kind] = (manifest, self.current)
                return True
        return False
