"""Issue 17, reliability round two: the classes of failure an independent red team found.

Each test reproduces its failure on the code before the fix: a worker killed by a raw queue
entry, a job left ``running`` after messages were lost, a task that gave up on a read-only or
silent database, memory spent before any limit was checked, untrusted text reaching
terminals, logs and spreadsheets, reports opening whatever a row names.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from db.engine import session_scope
from db.service import get_job
from producer.submit import submit_bytes, submit_paths, wait_for_job
from tests.support.fixtures import jpeg_bytes, write_images
from tests.support.hostile import RAW_MESSAGES
from tests.support.own_broker import broker, make_worker, prometheus_samples, rows_by_position  # noqa: F401  (fixtures)
from tests.support.servers import free_port
from tests.support.services import wait_until

pytestmark = pytest.mark.integration

PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, monkeypatch):
    """A database of this test's own (a fresh PostgreSQL one, not the session's): a reconciling
    worker must not find other tests' unfinished jobs and spend its time on them."""
    from db.config import clear_settings
    from db.engine import reset_engines
    from db.migrate import upgrade
    from tests.support.services import create_pg_database, drop_pg_database

    pg = request.param == "postgresql"
    url = create_pg_database() if pg else f"sqlite:///{tmp_path / 'sortline.db'}"
    upgrade(url)
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    clear_settings()
    yield url
    reset_engines()
    if pg:
        drop_pg_database(url)


def _assert_each_position_once(job_id: str, n: int) -> dict[int, object]:
    rows = rows_by_position(job_id)
    with session_scope() as s:
        job = get_job(s, job_id=job_id)
    assert sorted(rows) == list(range(n))
    assert job.status == "done" and job.done + job.failed == n == len(rows)
    return rows


def _metric(port: int, name: str) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return prometheus_samples(text, name)


# ------------------------------------------------------------------ 1. raw queue entries


@PG_ONLY
def test_malformed_raw_messages_mid_job_never_stop_the_worker(make_worker, broker, tmp_path):
    """Hundreds of raw entries of every malformed kind LPUSHed into each queue while a job
    runs: each is dropped, logged and counted; the job completes, each image exactly once."""
    port = free_port()
    w = make_worker(
        queues="cpu,gpu,training", concurrency=2, env={"SORTLINE_METRICS_PORT": str(port)}
    )
    n = 96
    job_id = submit_paths(write_images(tmp_path / "p", n), batch_size=4)
    queues, copies = ("cpu", "gpu", "training"), 3
    pushed = {q: 0 for q in queues}
    client = broker.client()

    def push() -> None:
        for _ in range(copies):
            for make in RAW_MESSAGES.values():
                for q in queues:
                    client.lpush(q, make())
                    pushed[q] += 1
            time.sleep(0.2)

    wait_until(lambda: len(rows_by_position(job_id)) >= 4, timeout=60, interval=0.05)  # mid-job
    sender = threading.Thread(target=push)
    sender.start()
    sender.join(60)
    wait_for_job(job_id, timeout=120)
    rows = _assert_each_position_once(job_id, n)
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()][:3]
    for q in queues:
        wait_until(lambda q=q: client.llen(q) == 0, timeout=60)
    assert w.proc.poll() is None, "the worker died"
    assert sum(pushed.values()) >= 300

    def counted():
        got = _metric(port, "sortline_malformed_messages_total{")
        return got if sum(got.values()) >= sum(pushed.values()) else None

    got = wait_until(counted, timeout=30)
    for q in queues:
        assert got[f'sortline_malformed_messages_total{{queue="{q}"}}'] == pushed[q]
    log = w.log.read_text(errors="replace")
    assert "Unrecoverable error" not in log
    assert log.count("dropped a malformed message") == sum(pushed.values())
    # the same worker still takes new work
    again = submit_paths(write_images(tmp_path / "q", 4), batch_size=2)
    assert wait_for_job(again, timeout=60).done == 4


# ------------------------------------------------------------------ 3. database faults


def _seconds(line: str) -> float:
    """The time of a Celery log line ``[2026-12-02 04:00:39,499: ...``, as an epoch time."""
    from datetime import datetime

    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_read_only_database_for_seconds_keeps_every_message(make_worker, tmp_path, monkeypatch):
    """PostgreSQL answering but read-only for 6 s (as in a failover), with one retry allowed:
    the messages are kept, not turned into error rows or acknowledged; nothing is lost."""
    import psycopg

    from db.migrate import upgrade
    from tests.support.servers import PostgresServer

    n = 120
    with PostgresServer(tmp_path / "pg") as pg:
        url = pg.create_database("sortline")
        upgrade(url)
        monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
        w = make_worker(
            concurrency=2,
            env={"SORTLINE_DATABASE_URL": url, "SORTLINE_TASK_MAX_RETRIES": "1"},
        )
        job_id = submit_paths(write_images(tmp_path / "p", n), batch_size=4)
        wait_until(lambda: len(rows_by_position(job_id)) >= 8, timeout=60, interval=0.05)

        def read_only(on: bool) -> None:
            with psycopg.connect(pg.admin_url, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {str(on).lower()}")
                conn.execute("SELECT pg_reload_conf()")

        read_only(True)
        time.sleep(6)
        read_only(False)
        wait_for_job(job_id, timeout=120)
        rows = _assert_each_position_once(job_id, n)
        assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()][:3]
        log = w.log.read_text(errors="replace")
        assert "database unavailable" in log and "read-only" in log
        w.stop()


@PG_ONLY
def test_database_black_hole_is_detected_in_seconds(make_worker, db_url, tmp_path):
    """The database's packets stop (a proxy that stops forwarding) for 8 s mid-job: the first
    timeout fires within SORTLINE_DB_TIMEOUT (+ its margin), not at the task's time limit,
    and every image still gets its label."""
    from sqlalchemy.engine import make_url

    from tests.support.servers import BlackHoleProxy

    u = make_url(db_url)
    n, timeout = 120, 2
    with BlackHoleProxy(u.port or 5432) as proxy:
        proxied = u.set(port=proxy.port).render_as_string(hide_password=False)
        w = make_worker(
            concurrency=2,
            env={
                "SORTLINE_DATABASE_URL": proxied,
                "SORTLINE_DB_TIMEOUT": str(timeout),
                "SORTLINE_TASK_TIME_LIMIT": "40",  # before: error rows at the soft limit (32 s)
            },
        )
        job_id = submit_paths(write_images(tmp_path / "p", n), batch_size=4)
        wait_until(lambda: len(rows_by_position(job_id)) >= 8, timeout=60, interval=0.05)
        proxy.hole()
        holed = time.time()
        time.sleep(8)
        proxy.heal()
        wait_for_job(job_id, timeout=120)
        rows = _assert_each_position_once(job_id, n)
        assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()][:3]
    lines = [
        line
        for line in w.log.read_text(errors="replace").splitlines()
        if "database unavailable" in line
    ]
    assert lines, "no database timeout was logged"
    first = _seconds(lines[0]) - holed
    print(f"\nfirst database timeout {first:.1f} s after the packets stopped")
    # a connection waits at most twice SORTLINE_DB_TIMEOUT; a task may meet it twice (its
    # pooled connection's ping, then a new connection's connect timeout), plus the poll
    assert first <= 4 * timeout + 2


@pytest.mark.slow  # the limits must outlast loading the model on a busy machine: 30 s
def test_worker_paused_past_its_time_limits_gives_no_error_rows(make_worker, tmp_path):
    """SIGSTOP the whole worker mid-job for longer than both time limits, then SIGCONT: the
    limits firing late are reasons to retry, so every image is still labelled."""
    import os
    import signal

    warm = make_worker()  # the model's ONNX export, cached for the worker below
    wait_for_job(submit_paths(write_images(tmp_path / "w", 1)), timeout=120)
    warm.stop()
    n, limit = 64, 30
    w = make_worker(concurrency=2, env={"SORTLINE_TASK_TIME_LIMIT": str(limit)})
    job_id = submit_paths(write_images(tmp_path / "p", n), batch_size=8)
    wait_until(lambda: len(rows_by_position(job_id)) >= 8, timeout=60, interval=0.02)
    os.killpg(w.proc.pid, signal.SIGSTOP)
    time.sleep(limit + 4)
    os.killpg(w.proc.pid, signal.SIGCONT)
    wait_for_job(job_id, timeout=120)
    rows = _assert_each_position_once(job_id, n)
    assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()][:3]
    assert w.proc.poll() is None


# ------------------------------------------------------------------ 2. lost messages


def _status_line(job_id: str) -> str:
    from click.testing import CliRunner

    from sortline.cli import cli

    out = CliRunner().invoke(cli, ["status", job_id])
    assert out.exit_code == 0, out.output
    return out.output.splitlines()[0]


@PG_ONLY
def test_job_survives_a_non_persistent_redis_restarted_mid_job(make_worker, tmp_path, monkeypatch):
    """Redis without persistence (as `sortline up` runs it) killed and restarted mid-job: the
    queued messages are gone; the job is reconciled and ends done, each position once."""
    import signal

    from tests.support.servers import RedisServer, use_broker

    server = RedisServer(tmp_path / "volatile", persist=False).start()
    app, original = use_broker(monkeypatch, server.url)
    try:
        env = {"SORTLINE_BROKER_URL": server.url, "SORTLINE_RECONCILE_AFTER": "3"}
        w = make_worker(concurrency=2, env=env)
        n = 300
        job_id = submit_paths(write_images(tmp_path / "p", n), batch_size=4)
        wait_until(lambda: len(rows_by_position(job_id)) >= 16, timeout=60, interval=0.02)
        server.stop(signal.SIGKILL)
        server.start()  # empty: the queue and the unacknowledged messages are gone
        at_restart = len(rows_by_position(job_id))
        assert at_restart < n - 40, "the job finished before Redis restarted; use more images"
        wait_for_job(job_id, timeout=120)
        rows = _assert_each_position_once(job_id, n)
        assert all(r.status == "ok" for r in rows.values()), [r.error for r in rows.values()][:3]
        log = w.log.read_text(errors="replace")
        assert "re-sent" in log
        print(f"\n{at_restart} rows when Redis restarted; the rest re-sent and labelled")
    finally:
        app.close()
        original.set_current()
        server.stop(signal.SIGKILL)


@PG_ONLY
def test_messages_deleted_by_hand_are_reconciled(make_worker, broker, tmp_path, monkeypatch):
    """Queued messages deleted from Redis before any worker saw them: `status` says the job
    is stalled; a worker re-sends the paths and records why the bytes cannot be re-sent."""
    monkeypatch.setenv("SORTLINE_RECONCILE_AFTER", "2")
    paths_job = submit_paths(write_images(tmp_path / "p", 40), batch_size=4)
    bytes_job = submit_bytes([jpeg_bytes(i) for i in range(6)], batch_size=2)
    assert broker.client().delete("cpu") == 1  # every message of both jobs
    assert "queued" in _status_line(paths_job)
    time.sleep(2.5)
    assert "stalled" in _status_line(paths_job)
    assert "stalled" in _status_line(bytes_job)

    env = {"SORTLINE_RECONCILE_AFTER": "2", "SORTLINE_RECONCILE_MAX_RESENDS": "2"}
    w = make_worker(env=env)
    wait_for_job(paths_job, timeout=60)
    rows = _assert_each_position_once(paths_job, 40)
    assert all(r.status == "ok" for r in rows.values())
    wait_for_job(bytes_job, timeout=60)
    rows = _assert_each_position_once(bytes_job, 6)
    assert all(
        r.status == "error" and "message lost" in r.error and "not kept" in r.error
        for r in rows.values()
    ), [r.error for r in rows.values()]
    assert "done" in _status_line(paths_job)
    assert w.proc.poll() is None
