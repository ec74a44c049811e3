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


def _pg_args(timeout: float) -> dict:
    """libpq options: connecting, statements and locks, and a silent network, all bounded."""
    ms = int(timeout * 1000)
    return {
        "connect_timeout": max(2, int(timeout)),
        "keepalives": 1,
        "keepalives_idle": max(1, int(timeout) // 3),
        "keepalives_interval": max(1, int(timeout) // 6),
        "keepalives_count": 3,
        "tcp_user_timeout": ms,
        "options": f"-c statement_timeout={ms} -c lock_timeout={ms}",
    }


def _connect_with_deadline(timeout: float):
    """A ``do_connect`` hook: psycopg connections that wait for an answer at most a while.

    Server-side timeouts cannot help when no packet reaches the server, and TCP timers
    cannot when something on the path still acknowledges packets (a stuck proxy): so every
    wait for the server ends after the statement timeout plus a margin, the connection is
    closed (SQLAlchemy sees a disconnect) and the caller gets an ``OperationalError``, as
    for a database that is down.
    """
    import psycopg

    wait_timeout = getattr(psycopg.errors, "_WaitTimeout", psycopg.errors.OperationalError)
    limit = timeout + min(5.0, timeout)

    class DeadlineConnection(psycopg.Connection):
        def wait(self, gen, *args, **kwargs):
            if len(args) < 2:
                kwargs.setdefault("timeout", limit)
            try:
                return super().wait(gen, *args, **kwargs)
            except wait_timeout:
                self.close()
                raise psycopg.OperationalError(
                    f"no answer from the database within {limit:g} s; connection closed "
                    "(SORTLINE_DB_TIMEOUT)"
                ) from None

    def connect(dialect, conn_rec, cargs, cparams):
        return DeadlineConnection.connect(*cargs, **cparams)

    return connect


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
        timeout = get_db_settings().db_timeout
        engine = create_engine(
            url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=_pg_args(timeout)
        )
        if engine.dialect.driver == "psycopg":
            event.listen(engine, "do_connect", _connect_with_deadline(timeout))
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
