"""Service functions over the models: keyword-only, typed, each taking a session."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Job, ModelRecord, Result, utcnow
from sortline.errors import NotFound

__all__ = ["NotFound"]  # raised by the look-ups below; re-exported for callers


# ---------------------------------------------------------------- jobs

FINAL = ("done", "cancelled", "failed")  # job states that rows arriving late do not change


def create_job(
    session: Session,
    *,
    source: str,
    queue: str,
    total: int,
    model_version: str | None = None,
    kind: str = "bulk",
) -> Job:
    """Insert a new job and return it (flushed, so its id is set)."""
    job = Job(
        source=source,
        queue=queue,
        total=total,
        model_version=model_version,
        kind=kind,
        status="open" if kind == "stream" else "queued",
    )
    session.add(job)
    session.flush()
    return job


def grow_job(session: Session, *, job_id: str, by: int) -> int:
    """Add *by* images to a streaming job's total; return the first new position."""
    row = session.execute(
        update(Job).where(Job.id == job_id).values(total=Job.total + by).returning(Job.total)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return row[0] - by


def close_job(session: Session, *, job_id: str) -> None:
    """Close a streaming job: it is done once every image it received has a row."""
    complete = Job.done + Job.failed >= Job.total
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "open")
        .values(
            status=case((complete, "done"), else_="running"),
            finished_at=case((complete, utcnow()), else_=None),
        )
    )


def end_job(session: Session, *, job_id: str, status: str) -> None:
    """Mark an unfinished job ``cancelled`` or ``failed``; rows already written stay."""
    if status not in ("cancelled", "failed"):
        raise ValueError(f"end_job sets cancelled or failed, not {status!r}")
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(FINAL))
        .values(status=status, finished_at=utcnow())
    )


def get_job(session: Session, *, job_id: str) -> Job:
    """Return the job by id, by unique id prefix, or ``latest`` for the newest job."""
    if job_id == "latest":
        job = session.scalars(select(Job).order_by(Job.created_at.desc()).limit(1)).first()
    else:
        job = session.get(Job, job_id)
        if job is None and len(job_id) >= 4:
            found = session.scalars(select(Job).where(Job.id.like(f"{job_id}%")).limit(2)).all()
            job = found[0] if len(found) == 1 else None
    if job is None:
        raise NotFound(f"no job {job_id!r}; `sortline jobs` lists the jobs")
    return job


def list_jobs(session: Session, *, limit: int = 20) -> Sequence[Job]:
    """The newest jobs first."""
    return session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)).all()


# ---------------------------------------------------------------- results


def _insert(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(Result)
    if dialect == "sqlite":
        return sqlite.insert(Result)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")


def existing_positions(session: Session, *, job_id: str, positions: Iterable[int]) -> set[int]:
    """Positions of *job_id* that already have a result row."""
    wanted = list(positions)
    if not wanted:
        return set()
    rows = session.scalars(
        select(Result.position).where(Result.job_id == job_id, Result.position.in_(wanted))
    )
    return set(rows)


def record_results(session: Session, *, job_id: str, rows: Sequence[dict[str, Any]]) -> int:
    """Insert result rows idempotently and advance the job's counters.

    A row whose (job, position) already exists is left as it is, and only rows really
    inserted count, so a redelivered message changes nothing. Returns how many were new.
    """
    if not rows:
        return 0
    now = utcnow()
    keys = set().union(*rows) - {"job_id", "created_at", "updated_at"}
    defaults = {"needs_review": False}
    values = [
        {
            **{k: r.get(k, defaults.get(k)) for k in keys},
            "needs_review": bool(r.get("needs_review", False)),
            "job_id": job_id,
            "created_at": now,
            "updated_at": now,
        }
        for r in rows
    ]
    stmt = (
        _insert(session)
        .values(values)
        .on_conflict_do_nothing(index_elements=["job_id", "position"])
        .returning(Result.status)
    )
    statuses = session.scalars(stmt).all()
    ok = sum(1 for s in statuses if s == "ok")
    err = len(statuses) - ok
    if statuses:
        finished = Job.done + ok + Job.failed + err
        version = next((r["model_version"] for r in rows if r.get("model_version")), None)
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                done=Job.done + ok,
                failed=Job.failed + err,
                status=case(
                    (Job.status == "open", Job.status),  # a stream still receiving images
                    (Job.status.in_(("cancelled", "failed")), Job.status),
                    (finished >= Job.total, "done"),
                    else_="running",
                ),
                finished_at=case(
                    ((Job.status != "open") & (finished >= Job.total), now),
                    else_=Job.finished_at,
                ),
                model_version=func.coalesce(Job.model_version, version),
            )
        )
    return len(statuses)


def list_results(
    session: Session,
    *,
    job_id: str,
    label: str | None = None,
    status: str | None = None,
    min_confidence: float | None = None,
    max_confidence: float | None = None,
    needs_review: bool | None = None,
    after_id: int | None = None,
    limit: int | None = None,
) -> Sequence[Result]:
    """A job's results in submission order, filtered."""
    q = select(Result).where(Result.job_id == job_id)
    if needs_review is not None:
        q = q.where(Result.needs_review.is_(needs_review))
    if label is not None:
        q = q.where(func.coalesce(Result.corrected_label, Result.label) == label)
    if status is not None:
        q = q.where(Result.status == status)
    if min_confidence is not None:
        q = q.where(Result.confidence >= min_confidence)
    if max_confidence is not None:
        q = q.where(Result.confidence <= max_confidence)
    if after_id is not None:  # rows written since an earlier read, in the order written
        q = q.where(Result.id > after_id).order_by(Result.id)
    else:
        q = q.order_by(Result.position)
    if limit is not None:
        q = q.limit(limit)
    return session.scalars(q).all()


def label_counts(session: Session, *, job_id: str) -> dict[str, int]:
    """Number of images per label (errors under ``"error"``)."""
    label = func.coalesce(Result.corrected_label, Result.label, "error")
    rows = session.execute(
        select(label, func.count()).where(Result.job_id == job_id).group_by(label)
    ).all()
    return {name: n for name, n in sorted(rows, key=lambda r: (-r[1], r[0]))}


def job_classes(session: Session, *, job_id: str) -> list[str] | None:
    """The classes of the model that labelled the job (its probabilities' keys), if any row has them."""
    probs = session.scalars(
        select(Result.probs).where(Result.job_id == job_id, Result.status == "ok").limit(1)
    ).first()
    return sorted(probs) if probs else None


def review_count(session: Session, *, job_id: str) -> int:
    """How many of a job's results are marked needs_review."""
    return session.scalar(
        select(func.count()).where(Result.job_id == job_id, Result.needs_review.is_(True))
    )


# ---------------------------------------------------------------- model registry


def register_model(
    session: Session,
    *,
    name: str,
    version: str,
    arch: str,
    path: str,
    sha256: str,
    classes: list[str],
    metrics: dict[str, Any] | None = None,
    activate: bool = True,
) -> ModelRecord:
    """Add (or update) a model in the registry, optionally making it the active one."""
    rec = session.scalars(
        select(ModelRecord).where(ModelRecord.name == name, ModelRecord.version == version)
    ).first()
    if rec is None:
        rec = ModelRecord(name=name, version=version)
        session.add(rec)
    rec.arch, rec.path, rec.sha256 = arch, path, sha256
    rec.classes, rec.metrics = classes, metrics or {}
    if activate:
        session.execute(update(ModelRecord).values(active=False))
    rec.active = activate
    session.flush()
    return rec


def active_model(session: Session) -> ModelRecord | None:
    """The active registered model, if any."""
    return session.scalars(select(ModelRecord).where(ModelRecord.active.is_(True))).first()


def models_at_path(session: Session, *, path: str) -> Sequence[ModelRecord]:
    """Registry entries whose artifact lives at *path*."""
    return session.scalars(select(ModelRecord).where(ModelRecord.path == path)).all()


# ---------------------------------------------------------------- review


def review_results(
    session: Session, *, job_id: str, max_confidence: float | None = None
) -> Sequence[Result]:
    """A job's labelled results awaiting review, in submission order.

    Those marked ``needs_review`` by the worker, or, with *max_confidence*, those whose
    confidence is below it and that have no corrected label yet.
    """
    q = select(Result).where(Result.job_id == job_id, Result.status == "ok")
    if max_confidence is None:
        q = q.where(Result.needs_review.is_(True))
    else:
        q = q.where(Result.confidence < max_confidence, Result.corrected_label.is_(None))
    return session.scalars(q.order_by(Result.position)).all()


def set_corrected_labels(session: Session, *, job_id: str, labels: dict[int, str]) -> int:
    """Record a person's label for each position of *job_id*; clear their ``needs_review``.

    Returns how many rows were updated (positions without a labelled row are ignored).
    """
    n = 0
    for position, label in labels.items():
        n += session.execute(
            update(Result)
            .where(Result.job_id == job_id, Result.position == position, Result.status == "ok")
            .values(corrected_label=label, needs_review=False, updated_at=utcnow())
        ).rowcount
    return n
