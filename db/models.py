"""SQLAlchemy 2.0 models: jobs, per-image results, the model registry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sortline.names import CPU_QUEUE

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Job(Base):
    """A batch or stream of images submitted together."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16), default="bulk")  # bulk | stream
    source: Mapped[str] = mapped_column(Text, default="")
    queue: Mapped[str] = mapped_column(String(32), default=CPU_QUEUE)
    model_version: Mapped[str | None] = mapped_column(String(128))
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # queued -> running -> done; a stream stays open until closed
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # the last new row (or reconciliation); a job quiet for SORTLINE_RECONCILE_AFTER is stalled
    progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    results: Mapped[list[Result]] = relationship(back_populates="job", lazy="raise")

    @property
    def finished(self) -> int:
        return self.done + self.failed


class Result(Base):
    """One image of a job: its label and probabilities, or the error that stopped it."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "position", name="uq_results_job_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    ref: Mapped[str] = mapped_column(Text)  # the path, or a content key for submitted bytes
    sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(8))  # ok | error
    label: Mapped[str | None] = mapped_column(String(64), index=True)
    confidence: Mapped[float | None] = mapped_column(Float, index=True)
    probs: Mapped[dict[str, float] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(128))
    worker: Mapped[str | None] = mapped_column(String(255))
    processing_ms: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)  # submitted -> row written
    # smallest Mahalanobis distance of the image's features to a training class (None: the
    # model has no statistics); unfamiliar: above the model's threshold, so needs_review
    unfamiliarity: Mapped[float | None] = mapped_column(Float)
    unfamiliar: Mapped[bool | None] = mapped_column(Boolean)
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False)
    corrected_label: Mapped[str | None] = mapped_column(String(64))
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    job: Mapped[Job] = relationship(back_populates="results", lazy="raise")


class JobItem(Base):
    """What the producer sent for one position: the file's path (None for submitted bytes)."""

    __tablename__ = "job_items"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[bytes | None] = mapped_column(LargeBinary)  # os.fsencode: any file name


class ModelRecord(Base):
    """A trained model in the registry; at most one is active."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    arch: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    classes: Mapped[list[str]] = mapped_column(JsonType)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
