"""Shared pieces of the benchmarks: images, a scratch PostgreSQL database, worker processes."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("SORTLINE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"


def images(data: Path, n: int) -> list[Path]:
    """The first *n* JPEGs under *data* (sorted), repeated if there are fewer."""
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images under {data}")
    return [files[i % len(files)] for i in range(n)]


def scratch_pg() -> str:
    import psycopg

    name = f"sortline_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name


def drop_pg(url: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


class Worker:
    """A real Celery worker process."""

    def __init__(self, env: dict, args: list[str], log: Path):
        self.name = f"bench-{uuid.uuid4().hex[:6]}"
        argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-n", f"{self.name}@%h",
                "--without-mingle", "--without-gossip", "-l", "WARNING", *args]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=open(log, "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        import socket

        from worker.app import app

        host = f"{self.name}@{socket.gethostname()}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if app.control.ping(destination=[host], timeout=0.5):
                return
        raise RuntimeError("worker did not start")

    def pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [self.proc.pid, *(int(p) for p in out.stdout.split())]

    def peak_rss_mb(self) -> dict[int, float]:
        """VmHWM (peak resident memory) of the worker's processes, MB."""
        peaks = {}
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[pid] = int(line.split()[1]) / 1024
            except OSError:
                pass
        return peaks

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
