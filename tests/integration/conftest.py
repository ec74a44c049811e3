"""Integration fixtures: the real Redis and PostgreSQL of this machine, real worker processes."""

from __future__ import annotations

import pytest
import redis

from tests.support.services import CeleryWorker, create_pg_database, drop_pg_database


@pytest.fixture(scope="session", autouse=True)
def _redis_clean():
    """A Redis database of our own, emptied before the session."""
    from worker.config import get_worker_settings

    url = get_worker_settings().broker_url
    client = redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as e:
        pytest.fail(f"Redis at {url} does not answer ({e}); .ci/run starts it")
    client.flushdb()
    yield
    client.flushdb()


@pytest.fixture(scope="session")
def pg_url_session():
    url = create_pg_database()
    from db.migrate import upgrade

    upgrade(url)
    yield url
    from db.engine import reset_engines

    reset_engines()
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path, monkeypatch):
    """Each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        from db.migrate import upgrade

        url = f"sqlite:///{tmp_path / 'sortline.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("pg_url_session")
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    from db.config import clear_settings

    clear_settings()  # settings read while the fixtures were set up name another database
    return url


@pytest.fixture
def make_worker(tiny_model, db_url, tmp_path):
    """Start real Celery worker processes against this test's database and the tiny model."""
    started: list[CeleryWorker] = []

    def start(
        *, queues="cpu", concurrency=1, env=None, extra=None, name=None, app=None
    ) -> CeleryWorker:
        w = CeleryWorker(
            {"SORTLINE_DATABASE_URL": db_url, "SORTLINE_MODEL": str(tiny_model), **(env or {})},
            queues=queues,
            concurrency=concurrency,
            extra=extra,
            name=name,
            log=tmp_path / f"worker-{len(started)}.log",
        )
        if app:
            w.argv[w.argv.index("worker.app")] = app
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()
