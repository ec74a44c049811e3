"""Fixtures for tests whose workers must not share a broker with anything else.

Import them into a test module (``from tests.support.own_broker import broker, make_worker``):
pytest uses fixtures a module imports.
"""

from __future__ import annotations

import pytest

from db.engine import session_scope
from db.service import list_results
from tests.support.servers import private_broker


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


def rows_by_position(job_id: str) -> dict[int, object]:
    """A job's result rows by position."""
    with session_scope() as s:
        return {r.position: r for r in list_results(s, job_id=job_id)}


def prometheus_samples(text: str, name: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition whose line starts with *name*."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
