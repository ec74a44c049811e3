"""Service functions over the models: keyword-only, typed, each taking a session."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Job, JobItem, ModelRecord, Result, utcnow
from db.text import JOB_ID_LENGTH, clean_text, is_job_id
from sortline.errors import NotFound, PromotionRefused

__all__ = ["NotFound", "PromotionRefused"]  # raised below; re-exported for callers

PROMOTION_METRIC = "macro_f1"  # on the val split, compared when a model is activated


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
    """Return the job by id, by unique id prefix (4 hex digits or more), or ``latest``."""
    if job_id == "latest":
        job = session.scalars(select(Job).order_by(Job.created_at.desc()).limit(1)).first()
        if job is None:
            raise NotFound("no job yet; `sortline submit` creates one")
        return job
    key = job_id.lower() if isinstance(job_id, str) else job_id
    if not is_job_id(key, prefix=True) or len(key) < 4:
        raise NotFound(
            f"{clean_text(str(job_id))[:80]!r} is not a job id: give its hex digits (at least "
            "4 of them), or 'latest'; `sortline jobs` lists the jobs"
        )
    job = session.get(Job, key) if len(key) == JOB_ID_LENGTH else None
    if job is None and len(key) >= 4:
        found = session.scalars(
            select(Job).where(Job.id.startswith(key, autoescape=True)).limit(2)
        ).all()
        if len(found) > 1:
            raise NotFound(
                f"job id prefix {key!r} is ambiguous: it matches more than one job; "
                "give more digits (`sortline jobs` lists the jobs)"
            )
        job = found[0] if found else None
    if job is None:
        raise NotFound(f"no job {key!r}; `sortline jobs` lists the jobs")
    return job


def record_items(session: Session, *, job_id: str, items: Sequence[dict[str, Any]]) -> None:
    """Record what is sent for each position (a path, or None for bytes), to re-send it."""
    if items:
        session.execute(
            insert(JobItem),
            [
                {
                    "job_id": job_id,
                    "position": it["pos"],
                    "path": os.fsencode(it["path"]) if it.get("path") is not None else None,
                }
                for it in items
            ],
        )


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite drops the zone


def job_state(job: Job, *, stalled_after: float, now: datetime | None = None) -> str:
    """The job's status, or ``stalled`` if it is unfinished and no row came for a while."""
    if job.status in ("queued", "running"):
        last = _aware(job.progress_at or job.created_at)
        if last < (now or utcnow()) - timedelta(seconds=stalled_after):
            return "stalled"
    return job.status


def _quiet_since(before: datetime):
    return (
        Job.status.in_(("queued", "running")),
        or_(Job.progress_at < before, Job.progress_at.is_(None) & (Job.created_at < before)),
    )


def stalled_jobs(session: Session, *, quiet_for: float, limit: int = 100) -> list[str]:
    """Ids of unfinished jobs without a new row for *quiet_for* seconds, oldest first."""
    before = utcnow() - timedelta(seconds=quiet_for)
    q = select(Job.id).where(*_quiet_since(before)).order_by(Job.created_at).limit(limit)
    return list(session.scalars(q))


def claim_stalled(session: Session, *, job_id: str, quiet_for: float) -> Job | None:
    """Take a stalled job for reconciling (once, among any number of callers): its progress
    clock restarts and its re-send count goes up. None if it is not stalled (any more)."""
    before = utcnow() - timedelta(seconds=quiet_for)
    claimed = session.execute(  # type: ignore[attr-defined]  # an UPDATE's result has rowcount
        update(Job)
        .where(Job.id == job_id, *_quiet_since(before))
        .values(progress_at=utcnow(), resends=Job.resends + 1)
    ).rowcount
    return session.get(Job, job_id, populate_existing=True) if claimed else None


def missing_items(session: Session, *, job: Job) -> dict[int, bytes | None]:
    """The positions of *job* without a row, each with the path sent for it (None: bytes,
    or nothing recorded)."""
    have = set(session.scalars(select(Result.position).where(Result.job_id == job.id)))
    missing = [p for p in range(job.total) if p not in have]
    paths = (
        dict(
            session.execute(
                select(JobItem.position, JobItem.path).where(
                    JobItem.job_id == job.id, JobItem.position.in_(missing)
                )
            ).all()
        )
        if missing
        else {}
    )
    return {p: paths.get(p) for p in missing}


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
                progress_at=now,
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
    if label is not None:
        q = q.where(func.coalesce(Result.corrected_label, Result.label) == label)
    if status is not None:
        q = q.where(Result.status == status)
    if min_confidence is not None:
        q = q.where(Result.confidence >= min_confidence)
    if max_confidence is not None:
        q = q.where(Result.confidence <= max_confidence)
    if needs_review is not None:
        q = q.where(Result.needs_review.is_(needs_review))
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
    return (
        session.scalar(
            select(func.count()).where(Result.job_id == job_id, Result.needs_review.is_(True))
        )
        or 0
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
) -> ModelRecord:
    """Add (or update) a model in the registry as a candidate; the active model is unchanged."""
    rec = session.scalars(
        select(ModelRecord).where(ModelRecord.name == name, ModelRecord.version == version)
    ).first()
    if rec is None:
        rec = ModelRecord(name=name, version=version, active=False)
        session.add(rec)
    rec.arch, rec.path, rec.sha256 = arch, path, sha256
    rec.classes, rec.metrics = classes, metrics or {}
    session.flush()
    return rec


def active_model(session: Session) -> ModelRecord | None:
    """The active registered model, if any."""
    return session.scalars(select(ModelRecord).where(ModelRecord.active.is_(True))).first()


def list_models(session: Session) -> Sequence[ModelRecord]:
    """Every registered model, newest first."""
    return session.scalars(
        select(ModelRecord).order_by(ModelRecord.created_at.desc(), ModelRecord.id.desc())
    ).all()


def get_model(session: Session, *, ref: str) -> ModelRecord:
    """The registered model ``NAME:VERSION``."""
    name, sep, version = ref.rpartition(":")
    rec = None
    if sep and name and version:
        rec = session.scalars(
            select(ModelRecord).where(ModelRecord.name == name, ModelRecord.version == version)
        ).first()
    if rec is None:
        raise NotFound(f"no registered model {ref!r}; `sortline models` lists NAME:VERSION of each")
    return rec


def val_score(rec: ModelRecord) -> float | None:
    """The validation macro-F1 a model was registered with, if it has one."""
    value = ((rec.metrics or {}).get("val") or {}).get(PROMOTION_METRIC)
    return float(value) if isinstance(value, int | float) else None


def activate_model(
    session: Session, *, ref: str, floor: float = 0.0, force: bool = False
) -> ModelRecord:
    """Make ``NAME:VERSION`` the active model (what workers load next).

    Unless *force*, a model whose validation macro-F1 is missing, below *floor* or below the
    active model's is refused with :class:`PromotionRefused`.
    """
    rec = get_model(session, ref=ref)
    current = active_model(session)
    if not force and rec is not current:
        score = val_score(rec)
        if score is None:
            raise PromotionRefused(
                f"{ref} has no recorded val {PROMOTION_METRIC}; --force to activate it anyway"
            )
        if score < floor:
            raise PromotionRefused(
                f"{ref} has val {PROMOTION_METRIC} {score:.3f}, below the floor {floor:.3f} "
                "(SORTLINE_PROMOTION_FLOOR); --force to activate it anyway"
            )
        best = val_score(current) if current is not None else None
        if current is not None and best is not None and score < best:
            raise PromotionRefused(
                f"{ref} has val {PROMOTION_METRIC} {score:.3f}, below the active "
                f"{current.name}:{current.version}'s {best:.3f}; --force to activate it anyway "
                "(a rollback)"
            )
    session.execute(update(ModelRecord).values(active=False))
    rec.active = True
    session.flush()
    return rec


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
        n += session.execute(  # type: ignore[attr-defined]  # an UPDATE's result has rowcount
            update(Result)
            .where(Result.job_id == job_id, Result.position == position, Result.status == "ok")
            .values(corrected_label=label, needs_review=False, updated_at=utcnow())
        ).rowcount
    return n
