"""Shared test configuration: a private redis-server per session, a tiny seeded model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_private_redis = None


def pytest_configure(config) -> None:
    """Give the session a redis-server of its own, so that test runs never share queues.

    Done before collection, since the Celery app reads its broker URL at import. Set
    SORTLINE_BROKER_URL to use another broker instead.
    """
    global _private_redis
    if "SORTLINE_BROKER_URL" in os.environ or hasattr(config, "workerinput"):
        return
    from tests.support.servers import RedisServer

    folder = Path(tempfile.mkdtemp(prefix="sortline-redis-"))
    _private_redis = RedisServer(folder, persist=False).start()
    os.environ["SORTLINE_BROKER_URL"] = _private_redis.url


def pytest_unconfigure(config) -> None:
    if _private_redis is not None:
        _private_redis.stop()


os.environ.setdefault("SORTLINE_HOME", tempfile.mkdtemp(prefix="sortline-home-"))
os.environ.setdefault("SORTLINE_CACHE_DIR", tempfile.mkdtemp(prefix="sortline-cache-"))
os.environ.pop("SORTLINE_ALLOWED_ROOTS", None)
# Workers reconcile stalled jobs of their database; the tests that check it set a short delay
# themselves. Elsewhere a later test's worker must not pick up an earlier test's unfinished job
# (it would add images to that test's metrics and time).
os.environ.setdefault("SORTLINE_RECONCILE_AFTER", "86400")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A seeded 'tiny' checkpoint with the six TrashNet classes."""
    from tests.support.fixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A fresh, migrated SQLite database."""
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'sortline.db'}"
    upgrade(url)
    return url


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Every test reads the settings from its own environment (they are cached per process)."""
    from db.config import clear_settings

    clear_settings()
    yield
    clear_settings()
