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
            shutil.which("redis-server") or "redis-server", "--port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
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
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        return self

    def start(self) -> PostgresServer:
        opts = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
            str(self.folder / "pg.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
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
