"""Where studies live: the storage URL, Optuna's RDB storage, the per-study lock."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from db.config import get_db_settings, mask_url
from training.config import TuneSettings, get_tune_settings
from training.tune.study import TuneError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


OPTUNA_SCHEMA = "optuna"


def storage_url(url: str | None = None) -> str:
    """The study storage: *url*, else ``SORTLINE_TUNE_STORAGE``, else sortline's database.

    Optuna keeps its own Alembic version table, which would clash with sortline's
    ``alembic_version``; so on sortline's own database its tables live apart: in the schema
    ``optuna`` of the same PostgreSQL database, or in ``<name>-optuna.db`` next to a SQLite
    file. A URL given in ``SORTLINE_TUNE_STORAGE`` (or *url*) is used as it is.
    """
    from sqlalchemy.engine import make_url

    from db.engine import normalise_url

    explicit = url or get_tune_settings().tune_storage
    u = make_url(normalise_url(explicit or get_db_settings().database_url))
    if not explicit:
        if u.drivername.startswith("postgresql") and "options" not in u.query:
            u = u.update_query_dict({"options": f"-csearch_path={OPTUNA_SCHEMA}"})
        elif u.drivername.startswith("sqlite") and u.database not in (None, "", ":memory:"):
            db = Path(u.database)
            u = u.set(database=str(db.with_name(f"{db.stem}-optuna{db.suffix or '.db'}")))
    return u.render_as_string(hide_password=False)


@lru_cache(maxsize=8)
def _ensure_schema(url: str) -> None:
    """Create the schema named in a PostgreSQL URL's search_path, if it is missing."""
    import re

    import sqlalchemy
    from sqlalchemy.engine import make_url

    u = make_url(url)
    m = re.search(r"search_path=([A-Za-z_][A-Za-z0-9_]*)", str(u.query.get("options", "")))
    if not u.drivername.startswith("postgresql") or not m:
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{m.group(1)}"'))
    except sqlalchemy.exc.IntegrityError:  # created by a concurrent process
        pass
    finally:
        engine.dispose()


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def check_parallel(url: str, parallel: int) -> None:
    """Refuse SQLite for more than one trial at a time, saying why and what to use."""
    if is_sqlite(url) and parallel != 1:
        raise TuneError(
            f"the study storage {mask_url(url)} is SQLite, which cannot run "
            f"{'parallel trials' if parallel == 0 else f'{parallel} trials at once'}: it has one "
            "writer lock for the whole file, so concurrent training workers stall and fail with "
            "'database is locked', and workers on other machines cannot share the file. Use "
            "PostgreSQL (SORTLINE_TUNE_STORAGE or SORTLINE_DATABASE_URL="
            "postgresql://user@host/db), or run one trial at a time with --parallel 1."
        )


_storages: dict[tuple, Any] = {}


def make_storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats and a retry callback for stale (killed) trials.

    One per process and URL (a worker runs many trials; each storage holds a pool).
    """
    import os

    s = get_tune_settings()
    url = storage_url(url)
    key = (os.getpid(), url, s.tune_heartbeat_interval, s.tune_grace_period, s.tune_max_retry)
    if key not in _storages:
        _storages[key] = _new_storage(url, s)
    return _storages[key]


def _new_storage(url: str, s: TuneSettings) -> optuna.storages.RDBStorage:
    import optuna

    kw: dict[str, Any] = {}
    if not is_sqlite(url):
        kw["engine_kwargs"] = {"pool_pre_ping": True}
        _ensure_schema(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

            callback = {"heartbeat_stale_trial_callback": Retry(max_retry=s.tune_max_retry)}
        except ImportError:  # optuna < 4.9
            from optuna.storages import RetryFailedTrialCallback as Retry

            callback = {"failed_trial_callback": Retry(max_retry=s.tune_max_retry)}
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=s.tune_heartbeat_interval,
            grace_period=s.tune_grace_period,
            **callback,
            **kw,
        )


def _lock_key(name: str) -> int:
    digest = hashlib.sha256(b"sortline-tune:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(url: str, name: str) -> Iterator[Callable[[], None]]:
    """Hold the study's lock; yield a function that releases it early (idempotent).

    PostgreSQL: a session advisory lock (freed by the server if the worker dies). SQLite: a
    lock file next to the database (one machine only, which is all SQLite supports).
    """
    released = False
    if is_sqlite(url):
        import fcntl

        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if not db or db == ":memory:":
            yield lambda: None
            return
        f = open(f"{db}.tune-lock", "a")  # noqa: SIM115
        fcntl.flock(f, fcntl.LOCK_EX)

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()

    elif url.startswith("postgresql"):
        from sqlalchemy import text

        from db.engine import get_engine

        conn = get_engine(url).connect()
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(name)})
        conn.commit()

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(name)})
                    conn.commit()
                finally:
                    conn.close()

    else:
        log.warning("no study lock for %s; run one training worker", url.split(":", 1)[0])
        yield lambda: None
        return
    try:
        yield release
    finally:
        release()
