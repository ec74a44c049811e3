"""Alembic migrations run from code: ``sortline db upgrade`` and auto-migration."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.engine import get_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at sortline's migrations and *url*'s engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = get_engine(url)
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at *url* up to *revision*."""
    command.upgrade(alembic_config(url), revision)


def is_current(url: str | None = None) -> bool:
    """Whether the database at *url* is at the newest migration."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() == head


def ensure_schema(url: str | None = None) -> None:
    """Upgrade the database if it is behind (used by commands that write jobs)."""
    if not is_current(url):
        log.info("upgrading the database schema")
        upgrade(url)
