"""Every API call the SDK makes, described once as a `Call` (method, path, body, how to parse the answer).
The sync and async resources run these same calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._base import Call, path_id
from .types import Artifact, Checkpoint, Dataset, Event, Job, MetricPoint, Model


def _page_of(model):
    return lambda body: ([model.model_validate(x) for x in body["data"]], bool(body.get("has_more")))


def _list_of(model):
    return lambda body: [model.model_validate(x) for x in body["data"]]


# datasets
def upload_dataset(file: Any, filename: str, name: str | None, format: str | None) -> Call:
    data = {k: v for k, v in {"name": name, "format": format}.items() if v}
    return Call(
        "POST",
        "/v1/datasets",
        files={"file": (filename, file, "application/jsonl")},
        data=data,
        parse=Dataset.model_validate,
    )


def list_datasets(limit: int | None, after: str | None = None) -> Call:
    return Call("GET", "/v1/datasets", params={"limit": limit, "after": after}, parse=_page_of(Dataset))


def get_dataset(id: str) -> Call:
    return Call("GET", f"/v1/datasets/{path_id(id)}", parse=Dataset.model_validate)


def delete_dataset(id: str) -> Call:
    return Call("DELETE", f"/v1/datasets/{path_id(id)}")


# models
def register_model(path: str | Path, name: str | None) -> Call:
    return Call(
        "POST", "/v1/models", json={"path": str(path)} | ({"name": name} if name else {}), parse=Model.model_validate
    )


def upload_model(file: Any, filename: str, name: str | None) -> Call:
    return Call(
        "POST",
        "/v1/models",
        files={"file": (filename, file, "application/octet-stream")},
        data={"name": name} if name else {},
        parse=Model.model_validate,
    )


def list_models(limit: int | None, after: str | None = None) -> Call:
    return Call("GET", "/v1/models", params={"limit": limit, "after": after}, parse=_page_of(Model))


def get_model(id: str) -> Call:
    return Call("GET", f"/v1/models/{path_id(id)}", parse=Model.model_validate)


# jobs
def create_job(body: dict[str, Any], idempotency_key: str | None) -> Call:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", "/v1/jobs", json=body, headers=headers, parse=Job.model_validate)


def list_jobs(
    status: str | None, kind: str | None, limit: int | None, after: str | None = None, parent_id: str | None = None
) -> Call:
    return Call(
        "GET",
        "/v1/jobs",
        params={"status": status, "kind": kind, "parent_id": parent_id, "limit": limit, "after": after},
        parse=_page_of(Job),
    )


def get_job(id: str) -> Call:
    return Call("GET", f"/v1/jobs/{path_id(id)}", parse=Job.model_validate)


def cancel_job(id: str) -> Call:
    return Call("POST", f"/v1/jobs/{path_id(id)}/cancel", parse=Job.model_validate)


def list_events(id: str, after: int | None) -> Call:
    return Call("GET", f"/v1/jobs/{path_id(id)}/events", params={"after": after}, parse=_page_of(Event))


def stream_events(id: str, after: int | None) -> Call:
    headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": str(after)} if after is not None else {})
    return Call("GET", f"/v1/jobs/{path_id(id)}/events/stream", headers=headers)


def list_metrics(id: str, name: str | None) -> Call:
    return Call("GET", f"/v1/jobs/{path_id(id)}/metrics", params={"name": name}, parse=_list_of(MetricPoint))


def list_checkpoints(id: str) -> Call:
    return Call("GET", f"/v1/jobs/{path_id(id)}/checkpoints", parse=_list_of(Checkpoint))


def list_artifacts(job_id: str) -> Call:
    return Call("GET", f"/v1/jobs/{path_id(job_id)}/artifacts", parse=_list_of(Artifact))


# artifacts
def get_artifact(id: str) -> Call:
    return Call("GET", f"/v1/artifacts/{path_id(id)}", parse=Artifact.model_validate)


def artifact_content(id: str, headers: dict[str, str]) -> Call:
    return Call("GET", f"/v1/artifacts/{path_id(id)}/content", headers=dict(headers))
