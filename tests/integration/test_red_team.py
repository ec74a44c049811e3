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
from db.service import get_job, list_results
from producer.submit import submit_paths, wait_for_job
from tests.support.fixtures import write_images
from tests.support.hostile import RAW_MESSAGES
from tests.support.servers import free_port, private_broker
from tests.support.services import wait_until

pytestmark = pytest.mark.integration

PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def broker(tmp_path, monkeypatch):
    """A redis-server of this test's own: no worker of another test run takes its messages."""
    with private_broker(tmp_path / "redis", monkeypatch) as server:
        yield server


@pytest.fixture
def make_worker(broker, make_worker):
    """The integration ``make_worker``, its workers on this test's own broker."""

    def start(*, env=None, **kw):
        return make_worker(env={"SORTLINE_BROKER_URL": broker.url, **(env or {})}, **kw)

    return start


def _rows(job_id: str) -> dict[int, object]:
    with session_scope() as s:
        return {r.position: r for r in list_results(s, job_id=job_id)}


def _assert_each_position_once(job_id: str, n: int) -> dict[int, object]:
    rows = _rows(job_id)
    with session_scope() as s:
        job = get_job(s, job_id=job_id)
    assert sorted(rows) == list(range(n))
    assert job.status == "done" and job.done + job.failed == n == len(rows)
    return rows


def _metric(port: int, name: str) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


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

    wait_until(lambda: len(_rows(job_id)) >= 4, timeout=60, interval=0.05)  # mid-job
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
