"""Shared test configuration: a separate Redis database and a tiny seeded model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before any sortline module reads its settings (the Celery app reads them at import).
os.environ.setdefault("SORTLINE_BROKER_URL", "redis://127.0.0.1:6379/11")
os.environ.setdefault("SORTLINE_HOME", tempfile.mkdtemp(prefix="sortline-home-"))
os.environ.setdefault("SORTLINE_CACHE_DIR", tempfile.mkdtemp(prefix="sortline-cache-"))
os.environ.pop("SORTLINE_ALLOWED_ROOTS", None)


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
