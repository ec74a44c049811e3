"""Engines and sessions: one engine per process and URL, recreated after fork."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from db.config import get_db_settings

log = logging.getLogger(__name__)

_engines: dict[str, tuple[int, Engine]] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def normalise_url(url: str) -> str:
    """*url* with a bare ``postgresql://`` or ``postgres://`` given sortline's driver (psycopg 3)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def get_engine(url: str | None = None) -> Engine:
    """Return this process's engine for *url* (default: ``SORTLINE_DATABASE_URL``)."""
    url = normalise_url(url or get_db_settings().database_url)
    pid = os.getpid()
    cached = _engines.get(url)
    if cached is not None:
        owner, engine = cached
        if owner == pid:
            return engine
        # Inherited across fork: drop the parent's pool without closing its sockets.
        engine.dispose(close=False)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    _engines[url] = (pid, engine)
    return engine


def reset_engines() -> None:
    """Forget every engine of this process (called in a freshly forked worker child)."""
    for _, engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
