"""Real services for integration tests: PostgreSQL databases and Celery worker processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import redis

log = logging.getLogger(__name__)

PG_ADMIN = os.environ.get("SORTLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parents[2]


def create_pg_database() -> str:
    """Create an empty PostgreSQL database; return its SQLAlchemy URL."""
    name = f"sortline_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class CeleryWorker:
    """A real `celery -A worker.app worker` process with its own environment."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        queues: str = "cpu",
        concurrency: int = 1,
        name: str | None = None,
        extra: list[str] | None = None,
        log: Path | None = None,
    ):
        self.name = name or f"test-{uuid.uuid4().hex[:6]}"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency),
            "-n",
            f"{self.name}@%h",
            "-E",
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            *(extra or []),
        ]
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def hostname(self) -> str:
        import socket

        return f"{self.name}@{socket.gethostname()}"

    def start(self, timeout: float = 60) -> CeleryWorker:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        from worker.app import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log: {self.log}")
            try:
                replies = app.control.ping(destination=[self.hostname], timeout=0.5) or []
            except (redis.RedisError, OSError) as e:  # a pooled connection to a broker gone since
                log.info("ping failed (%s); retrying", e)
                time.sleep(0.2)
                continue
            if replies:
                return self
        raise RuntimeError(f"worker {self.name} did not answer a ping; log: {self.log}")

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 60, interval: float = 0.2):
    """Poll *predicate* until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")
