"""Private Redis and PostgreSQL servers that a fault test may stop and restart at will."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis

PG_BIN = Path(os.environ.get("SORTLINE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout} s")


class RedisServer:
    """A redis-server on a spare port, persisting every write (appendfsync always)."""

    def __init__(
        self,
        folder: Path,
        *,
        password: str | None = None,
        port: int | None = None,
        persist: bool = True,
    ):
        self.folder = folder
        self.persist = persist
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> RedisServer:
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--logfile",
            str(self.folder / "redis.log"),
        ]
        argv += (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL)
        _wait(self._ping, 20, f"redis-server on port {self.port}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown; SIGKILL: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGKILL)


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb in *folder*), on a spare port, trust auth."""

    def __init__(self, folder: Path | None = None, *, port: int | None = None):
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if folder is None or self._as_postgres:  # pytest's tmp_path is private to root
            folder = Path(tempfile.mkdtemp(prefix="sortline-pg-"))
            self._owned = True
        else:
            self._owned = False
        self.folder = folder
        self.data = folder / "data"
        self.port = port or free_port()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> PostgresServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
            self.folder.chmod(0o700)
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        return self

    def start(self) -> PostgresServer:
        opts = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.folder / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop it: ``fast`` (connections cut) or ``immediate`` (as in a crash)."""
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.init().start()

    def __exit__(self, *exc) -> None:
        self.stop("immediate")
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)


def use_broker(monkeypatch, url: str, **transport_options):
    """Point this test process's Celery app (producer, pings) at the broker *url*.

    ``worker.app.app`` is replaced for the test; monkeypatch puts the original back.
    """
    import worker.app as worker_app

    app = worker_app.make_app()
    app.conf.broker_url = url
    if transport_options:
        app.conf.broker_transport_options = transport_options
    original = worker_app.app
    monkeypatch.setattr(worker_app, "app", app)
    return app, original


@contextmanager
def private_broker(
    folder: Path, monkeypatch, *, password: str | None = None
) -> Iterator[RedisServer]:
    """A redis-server of one test's own, with this process's Celery app pointed at it."""
    server = RedisServer(folder, password=password).start()
    app, original = use_broker(monkeypatch, server.url)
    try:
        yield server
    finally:
        app.close()
        original.set_current()
        server.stop(signal.SIGKILL)


class BlackHoleProxy:
    """A TCP forwarder to *target* that can stop forwarding, as a network that drops packets.

    While :meth:`hole` is in effect, connections are still accepted and bytes still read (so
    the client's kernel sees every packet acknowledged, and no TCP timer fires) but nothing is
    passed on either way; :meth:`heal` closes the connections cut off that way and forwards
    new ones again.
    """

    def __init__(self, target_port: int, *, host: str = "127.0.0.1"):
        import selectors

        self.target = (host, target_port)
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._peer: dict[socket.socket, socket.socket | None] = {}
        self._holed: set[socket.socket] = set()
        self._blackhole = False
        self._stop = False
        self._thread: object | None = None

    def start(self) -> BlackHoleProxy:
        import selectors
        import threading

        self._sel.register(self.listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def hole(self) -> None:
        """Stop forwarding: every byte from now on, either way, is dropped."""
        self._blackhole = True

    def heal(self) -> None:
        """Forward again (for new connections; those cut off are closed)."""
        self._blackhole = False

    def _close(self, s: socket.socket) -> None:
        for x in (s, self._peer.pop(s, None)):
            if x is not None:
                self._peer.pop(x, None)
                self._holed.discard(x)
                with _suppress():
                    self._sel.unregister(x)
                x.close()

    def _run(self) -> None:
        import selectors

        while not self._stop:
            if not self._blackhole and self._holed:
                for s in list(self._holed):
                    self._close(s)
            for key, _ in self._sel.select(timeout=0.1):
                s = key.fileobj
                if s is self.listener:
                    client, _ = self.listener.accept()
                    upstream = None
                    if not self._blackhole:
                        upstream = socket.create_connection(self.target)
                        self._peer[upstream] = client
                        self._sel.register(upstream, selectors.EVENT_READ)
                    else:
                        self._holed.add(client)
                    self._peer[client] = upstream
                    self._sel.register(client, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._close(s)
                    continue
                if self._blackhole:
                    self._holed.add(s)
                    continue
                peer = self._peer.get(s)
                if peer is None or s in self._holed:
                    continue
                try:
                    peer.sendall(data)
                except OSError:
                    self._close(s)

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)
        for s in list(self._peer):
            with _suppress():
                s.close()
        self.listener.close()

    def __enter__(self) -> BlackHoleProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _suppress():
    import contextlib

    return contextlib.suppress(Exception)
