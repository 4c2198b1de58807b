"""The database: the source of truth for every project, dataset, model, job and artifact.

Public ids are strings with a type prefix and a time-ordered body (`job_0193f2...`), so "newest first" and
cursor pagination (`after=<id>`) are plain comparisons on the primary key.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

Json = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_id_clock = {"ms": 0, "seq": 0}
_id_lock = threading.Lock()


# What an id may contain: `new_id` makes `prefix_` + hex digits; the API refuses anything else (a NUL, CR/LF)
# before it reaches the database or a log line.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,80}$"


def new_id(prefix: str) -> str:
    """`prefix_` + 12 hex digits of milliseconds + a 4-digit sequence + 8 random hex digits: unique, and in
    creation order (strictly within a process, even within one millisecond)."""
    with _id_lock:
        ms = int(time.time() * 1000)
        if ms <= _id_clock["ms"]:
            _id_clock["seq"] += 1
        else:
            _id_clock.update(ms=ms, seq=0)
        ms, seq = _id_clock["ms"], _id_clock["seq"]
    return f"{prefix}_{ms:012x}{seq & 0xFFFF:04x}{os.urandom(4).hex()}"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: Json}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("prj"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A bearer key: only its sha256 is stored; `prefix` (the key's first characters) finds the row."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    project: Mapped[Project] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(20))
    path: Mapped[str] = mapped_column(Text)  # under the artifact root
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    records: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))  # path | upload
    format: Mapped[str] = mapped_column(String(20))  # mlx | gguf
    path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))  # content hash at registration: part of cache keys
    info: Mapped[dict] = mapped_column(default=dict)  # config summary: model_type, layers, vocab, params
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    spec: Mapped[dict]
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    cache_key: Mapped[str | None] = mapped_column(String(64), index=True)  # teacher_cache jobs: dedup key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # last time a message was handed to the broker
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    summary: Mapped[dict] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(40))
    error_message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_jobs_project_kind_status", "project_id", "kind", "status"),)


class JobDependency(Base):
    """`job_id` runs only after `depends_on_id` succeeded (an offline distill waits for its teacher caches)."""

    __tablename__ = "job_dependencies"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    depends_on_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True, index=True)


class JobEvent(Base):
    """What happened, in order; the integer id is the SSE event id (`Last-Event-ID`)."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StepMetric(Base):
    """One number of one logged step: long format, so `?name=` selects a series."""

    __tablename__ = "step_metrics"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))  # train | eval
    name: Mapped[str] = mapped_column(String(80))
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_step_metrics_job_name_step", "job_id", "name", "step"),
        # a step's number is written once, whoever retries or resumes (see worker.recorder)
        Index("uq_step_metrics_point", "job_id", "kind", "step", "name", unique=True),
    )


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "step"),)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)  # relative to the job's output: adapters.safetensors, student/...
    path: Mapped[str] = mapped_column(Text)  # under the artifact root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TeacherCacheRecord(Base):
    """A finished teacher cache on disk, by content key, and the job that built it."""

    __tablename__ = "teacher_caches"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    """First response to a POST with an `Idempotency-Key`, replayed for the same key and body."""

    __tablename__ = "idempotency_keys"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
