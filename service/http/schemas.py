"""What crosses the HTTP edge: request bodies (pydantic, so job specs validate with the contract's models)
and response objects (msgspec structs), plus the converters from database rows."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast, overload

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from distillery_contract import specs as contract_specs
from distillery_contract.jobs import JOB_KINDS, JOB_STATUSES, JobKind, JobStatus  # noqa: F401 (re-exported)
from distillery_contract.specs import (
    SPEC_MODELS,
    BenchmarkSpec,
    CompareSpec,
    DistillSpec,
    GenerateSpec,
    TeacherCacheSpec,
)
from service.core.db.models import Artifact, Checkpoint, Dataset, Job, JobEvent, Model, StepMetric


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without a zone; they were written in UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------- requests


class JobCreate(BaseModel):
    """`POST /v1/jobs`. `spec` is validated by the model of its `kind` (errors name `spec.<field>`)."""

    model_config = ConfigDict(extra="forbid")
    kind: JobKind
    spec: DistillSpec | TeacherCacheSpec | BenchmarkSpec | GenerateSpec | CompareSpec
    parent_id: str | None = Field(None, max_length=40, description="An earlier job of the project this one follows.")

    @field_validator("spec", mode="plain")
    @classmethod
    def _spec_of_kind(cls, value: Any, info: ValidationInfo) -> BaseModel:
        model = SPEC_MODELS.get(info.data.get("kind", ""))
        if model is None:  # `kind` is invalid and reported as such; the spec cannot be judged without it
            return value
        return model.model_validate(value)


def request_models() -> list[type[BaseModel]]:
    """Every pydantic model a request body is validated with: the job specs and their parts, and the bodies."""
    parts = [
        v
        for v in vars(contract_specs).values()
        if isinstance(v, type)
        and issubclass(v, BaseModel)
        and v.__module__ == contract_specs.__name__
        and not v.__name__.startswith("_")
    ]  # not the private base class
    return [*parts, JobCreate, ModelRegister]


class ModelRegister(BaseModel):
    """`POST /v1/models` with JSON: a model folder (mlx-lm) or a .gguf file on the server."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    path: str = Field(min_length=1, max_length=4096, description="Absolute server path of the folder or file.")


# ------------------------------------------------------------------------------------------ responses


class DatasetOut(msgspec.Struct):
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    records: int
    created_at: datetime


class DatasetPage(msgspec.Struct):
    data: list[DatasetOut]
    has_more: bool


class ModelOut(msgspec.Struct):
    id: str
    name: str
    format: str
    source: str
    path: str | None
    fingerprint: str
    info: dict[str, Any]
    created_at: datetime


class ModelPage(msgspec.Struct):
    data: list[ModelOut]
    has_more: bool


class ArtifactOut(msgspec.Struct):
    id: str
    job_id: str
    name: str
    size_bytes: int
    sha256: str
    content_type: str
    created_at: datetime


class ArtifactList(msgspec.Struct):
    data: list[ArtifactOut]


class ProgressOut(msgspec.Struct):
    step: int
    total_steps: int | None
    fraction: float | None
    eta_seconds: float | None


class WaitingOut(msgspec.Struct):
    """A job a queued job waits for; `fraction` is its own progress."""

    id: str
    kind: JobKind
    status: JobStatus
    fraction: float | None


class ErrorOut(msgspec.Struct):
    code: str | None
    message: str | None


class JobOut(msgspec.Struct):
    id: str
    kind: JobKind  # Literal types: the OpenAPI schema lists the values (msgspec does not check on encode)
    status: JobStatus
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: ProgressOut
    summary: dict[str, Any]
    error: ErrorOut | None
    parent_id: str | None
    cancel_requested: bool
    artifacts: list[ArtifactOut]
    waiting_on: list[WaitingOut]  # while queued: the jobs it needs that have not succeeded yet


class JobPage(msgspec.Struct):
    data: list[JobOut]
    has_more: bool


class EventOut(msgspec.Struct):
    id: int
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class EventPage(msgspec.Struct):
    data: list[EventOut]
    has_more: bool


class MetricPointOut(msgspec.Struct):
    step: int
    kind: str
    name: str
    value: float


class MetricList(msgspec.Struct):
    data: list[MetricPointOut]


class CheckpointOut(msgspec.Struct):
    id: str
    step: int
    created_at: datetime


class CheckpointList(msgspec.Struct):
    data: list[CheckpointOut]


class CacheUseOut(msgspec.Struct):
    teacher: str
    dataset: str
    top_k: int
    max_seq_len: int
    job_id: str | None  # the teacher_cache job that would be reused; None: one would be built first
    status: str | None


class EstimateOut(msgspec.Struct):
    kind: JobKind
    tokens: int | None
    memory_bytes: int | None
    seconds: float | None
    teacher_caches: list[CacheUseOut]
    notes: list[str]


class ReadyOut(msgspec.Struct):
    status: str
    checks: dict[str, str]


# ---------------------------------------------------------------------------------------- converters


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        format=row.format,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        records=row.records,
        created_at=as_utc(row.created_at),
    )


def model_out(row: Model) -> ModelOut:
    return ModelOut(
        id=row.id,
        name=row.name,
        format=row.format,
        source=row.source,
        path=row.path if row.source == "path" else None,
        fingerprint=row.fingerprint,
        info=dict(row.info or {}),
        created_at=as_utc(row.created_at),
    )


def artifact_out(row: Artifact) -> ArtifactOut:
    return ArtifactOut(
        id=row.id,
        job_id=row.job_id,
        name=row.name,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        content_type=row.content_type,
        created_at=as_utc(row.created_at),
    )


def job_out(row: Job, artifacts: list[Artifact], waiting_on: list[dict[str, Any]] | None = None) -> JobOut:
    total = row.total_steps
    fraction = min(1.0, row.progress_step / total) if total else None
    error = ErrorOut(code=row.error_code, message=row.error_message) if row.error_code else None
    return JobOut(
        id=row.id,
        kind=cast(JobKind, row.kind),  # the database holds only these (the API wrote them)
        status=cast(JobStatus, row.status),
        spec=dict(row.spec or {}),
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at),
        finished_at=as_utc(row.finished_at),
        progress=ProgressOut(step=row.progress_step, total_steps=total, fraction=fraction, eta_seconds=row.eta_seconds),
        summary=dict(row.summary or {}),
        error=error,
        parent_id=row.parent_id,
        cancel_requested=bool(row.cancel_requested),
        artifacts=[artifact_out(a) for a in artifacts],
        waiting_on=[
            WaitingOut(id=w["id"], kind=w["kind"], status=w["status"], fraction=w["fraction"]) for w in waiting_on or []
        ],
    )


def event_out(row: JobEvent) -> EventOut:
    return EventOut(
        id=row.id, kind=row.kind, message=row.message, data=dict(row.data or {}), created_at=as_utc(row.created_at)
    )


def metric_out(row: StepMetric) -> MetricPointOut:
    return MetricPointOut(step=row.step, kind=row.kind, name=row.name, value=row.value)


def checkpoint_out(row: Checkpoint) -> CheckpointOut:
    return CheckpointOut(id=row.id, step=row.step, created_at=as_utc(row.created_at))


def to_json(obj: msgspec.Struct) -> dict[str, Any]:
    """A response object as plain JSON values (what an idempotency record replays)."""
    return msgspec.to_builtins(obj)
