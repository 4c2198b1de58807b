"""Typed views of the API's objects. Unknown fields are kept (a newer server may add some)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from distillery_contract.jobs import TERMINAL, JobStatus  # noqa: F401 (TERMINAL is re-exported for the clients)


class _Obj(BaseModel):
    model_config = ConfigDict(extra="allow")


class Dataset(_Obj):
    id: str
    name: str
    format: str
    sha256: str | None = None
    size_bytes: int | None = None
    records: int | None = None
    created_at: datetime | None = None


class Model(_Obj):
    id: str
    name: str
    format: str | None = None
    source: str | None = None
    path: str | None = None
    fingerprint: str | None = None
    info: dict[str, Any] = {}
    created_at: datetime | None = None


class Artifact(_Obj):
    id: str
    job_id: str
    name: str
    size_bytes: int
    sha256: str
    content_type: str | None = None
    created_at: datetime | None = None


class Progress(_Obj):
    step: int = 0
    total_steps: int | None = None
    fraction: float | None = None
    eta_seconds: float | None = None


class JobError(_Obj):
    code: str | None = None  # distillery_contract.ERROR_CODES: user_error, resource or internal_error
    message: str | None = None


class JobWarning(_Obj):
    """Something about a finished job's result the user must know, e.g. `no_improvement`: no trained step
    beat the starting student, so the run shipped the student unchanged."""

    code: str
    message: str


class WaitingOn(_Obj):
    """A job a queued job waits for (a teacher cache it needs, the distill job whose adapter it scores)."""

    id: str
    kind: str
    status: JobStatus
    fraction: float | None = None


class Job(_Obj):
    id: str
    kind: str
    status: JobStatus
    spec: dict[str, Any] = {}
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Progress()
    summary: dict[str, Any] = {}
    error: JobError | None = None
    parent_id: str | None = None
    cancel_requested: bool = False
    artifacts: list[Artifact] = []
    waiting_on: list[WaitingOn] = []  # while queued: the unfinished jobs it needs first

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def warnings(self) -> list[JobWarning]:
        """The run's warnings about its result (`summary.warnings`); empty while running or when all is well."""
        raw = self.summary.get("warnings") or []
        return [JobWarning.model_validate(w) for w in raw if isinstance(w, dict) and "message" in w]


class JobState(_Obj):
    """A job's changing state as the event stream reports it (no id: a snapshot, not a stored event)."""

    status: JobStatus
    progress: Progress = Progress()
    summary: dict[str, Any] = {}
    waiting_on: list[WaitingOn] = []

    @classmethod
    def of(cls, job: Job) -> JobState:
        return cls(status=job.status, progress=job.progress, summary=job.summary, waiting_on=job.waiting_on)


class Event(_Obj):
    id: int
    kind: str
    message: str | None = None
    data: dict[str, Any] = {}
    created_at: datetime | None = None


class MetricPoint(_Obj):
    step: int
    kind: str | None = None
    name: str
    value: float


class Checkpoint(_Obj):
    id: str
    step: int
    created_at: datetime | None = None
