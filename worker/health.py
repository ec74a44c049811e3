"""``sortline health``: is the broker, the database, the model and a worker there?

Each check returns a :class:`Check`; the CLI prints them and exits non-zero naming what is
down. The compose file uses it as the health check of the sortline containers.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHECKS = ("broker", "database", "model", "workers")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_broker(url: str | None = None, timeout: float = 3.0) -> Check:
    """The Redis broker answers PING (with the configured password)."""
    from db.config import mask_url
    from worker.config import get_worker_settings
    from worker.stack import broker_answers

    url = url or get_worker_settings().broker_url
    if broker_answers(url, timeout):
        return Check("broker", True, mask_url(url))
    return Check(
        "broker", False, f"{mask_url(url)} does not answer PING (down, wrong password or host)"
    )


def check_database(url: str | None = None, timeout: float = 3.0) -> Check:
    """The database accepts a connection and its schema is at the newest migration."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from db.config import get_db_settings, mask_url
    from db.engine import normalise_url
    from db.migrate import is_current

    url = normalise_url(url or get_db_settings().database_url)
    shown = mask_url(url)
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database and u.database != ":memory:" and not Path(u.database).exists():
            return Check("database", False, f"{shown}: no such file; run `sortline db upgrade`")
        args = {}
    else:
        args = {"connect_timeout": max(1, int(timeout))}
    engine = create_engine(u, poolclass=NullPool, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        return Check("database", False, f"{shown}: cannot connect ({reason})")
    finally:
        engine.dispose()
    try:
        current = is_current(url)
    except Exception as e:
        return Check("database", False, f"{shown}: cannot read the schema version ({e})")
    if not current:
        return Check("database", False, f"{shown}: schema is behind; run `sortline db upgrade`")
    return Check("database", True, shown)


def check_model(*, registry: bool = True) -> Check:
    """The checkpoint a worker would load exists, is a sortline checkpoint, matches its sha256.

    With *registry* false (the database is down) only the settings choose the file.
    """
    from training.config import DEFAULT_CHECKPOINT
    from training.model.checkpoint import (
        CheckpointError,
        model_version,
        read_metadata,
        verify_sha256,
    )
    from worker.config import get_worker_settings
    from worker.runtime import ModelChoice, choose_model

    if registry:
        choice = choose_model()
    else:
        configured = get_worker_settings().model
        choice = ModelChoice(Path(configured) if configured else DEFAULT_CHECKPOINT, None)
    try:
        meta = read_metadata(choice.path)
    except CheckpointError as e:
        return Check("model", False, f"{e}; set SORTLINE_MODEL or bake the model into the image")
    except OSError as e:
        return Check("model", False, f"{choice.path}: {e}")
    try:
        verify_sha256(choice.path, choice.expected_sha256)
    except CheckpointError as e:
        return Check("model", False, str(e))
    return Check("model", True, f"{choice.path} ({model_version(meta)})")


def expand_node(name: str) -> str:
    """Celery's ``%h`` (this host's name) in a node name, as ``-n`` understands it."""
    return name.replace("%h", socket.gethostname())


def check_workers(
    queues: tuple[str, ...] | list[str] = (),
    nodes: tuple[str, ...] | list[str] = (),
    timeout: float = 3.0,
) -> Check:
    """Workers answer Celery's inspect: any at all, each of *nodes*, one per queue of *queues*."""
    from worker.app import app

    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as e:
        return Check("workers", False, f"cannot ask the workers: {e}")
    served = {node: sorted(q["name"] for q in qs or []) for node, qs in replies.items()}
    missing_nodes = [n for n in map(expand_node, nodes) if n not in served]
    have = {q for qs in served.values() for q in qs}
    missing_queues = [q for q in queues if q not in have]
    problems = []
    if not served:
        problems.append(f"no worker answered within {timeout:g} s")
    if missing_nodes:
        problems.append("no answer from " + ", ".join(missing_nodes))
    if missing_queues:
        problems.append("no worker consumes queue " + ", ".join(missing_queues))
    if problems:
        return Check("workers", False, "; ".join(problems))
    listing = ", ".join(f"{n} ({','.join(qs)})" for n, qs in sorted(served.items()))
    return Check("workers", True, listing)


def run_checks(
    checks: tuple[str, ...] | list[str] = CHECKS,
    *,
    queues: tuple[str, ...] | list[str] = (),
    nodes: tuple[str, ...] | list[str] = (),
    timeout: float = 3.0,
) -> list[Check]:
    """Run *checks* in order; workers are not asked when the broker is down."""
    out: list[Check] = []
    broker_ok = True
    if "broker" in checks or "workers" in checks:
        b = check_broker(timeout=timeout)
        broker_ok = b.ok
        if "broker" in checks:
            out.append(b)
    db_ok = "database" not in checks  # not checked: let the registry lookup try
    if "database" in checks:
        out.append(check_database(timeout=timeout))
        db_ok = out[-1].ok
    if "model" in checks:
        out.append(check_model(registry=db_ok))
    if "workers" in checks:
        if broker_ok:
            out.append(check_workers(queues, nodes, timeout))
        else:
            out.append(Check("workers", False, "not asked: the broker is down"))
    return out
