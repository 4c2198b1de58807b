"""Small pydantic views of the API's objects (unknown fields are kept)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Obj(BaseModel):
    model_config = ConfigDict(extra="allow")


class Dataset(_Obj):
    id: str
    name: str | None = None
    format: str | None = None
    records: int | None = None
    size_bytes: int | None = None


class Model(_Obj):
    id: str
    name: str | None = None
    format: str | None = None
    path: str | None = None


class Artifact(_Obj):
    id: str
    job_id: str | None = None
    name: str
    size_bytes: int | None = None
    sha256: str | None = None


class Job(_Obj):
    id: str
    kind: str
    status: str
    spec: dict[str, Any] = {}
    progress: dict[str, Any] | None = None
    summary: dict[str, Any] = {}
    error: dict[str, Any] | None = None
    parent_id: str | None = None
    artifacts: list[Artifact] = []

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class Event(_Obj):
    id: int
    kind: str
    message: str | None = None
    data: dict[str, Any] = {}


class MetricPoint(_Obj):
    step: int
    kind: str | None = None
    name: str
    value: float


TERMINAL = {"succeeded", "failed", "cancelled"}
