"""Objects for API tests: tiny datasets, fake model folders (the API only reads config.json and file names),
jobs and artifacts written straight into the database."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service.core import lifecycle
from service.core.db.models import Artifact, Job, new_id

TEXT_JSONL = b'{"text": "To be, or not to be."}\n{"text": "That is the question."}\n'


def upload_dataset(api, content: bytes = TEXT_JSONL, headers=None, **data) -> dict:
    r = api.client.post(
        "/v1/datasets", headers=headers or api.headers, files={"file": ("train.jsonl", content)}, data=data
    )
    assert r.status_code == 201, r.text
    return r.json()


def model_folder(root: Path, name: str = "tiny", layers: int = 2) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": layers, "vocab_size": 512, "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 128)
    return folder


def register_model(api, name: str = "tiny", headers=None) -> dict:
    folder = model_folder(api.tmp / "models", name)
    r = api.client.post("/v1/models", headers=headers or api.headers, json={"name": name, "path": str(folder)})
    assert r.status_code == 201, r.text
    return r.json()


def distill_spec(student: str, teacher: str, train: str, **overrides) -> dict:
    spec = {
        "student": {"model": student},
        "teachers": [{"model": teacher}],
        "data": {"train": train, "valid": 0.25},
        "loss": {"kind": "forward_kl", "top_k": 8},
        "training": {"steps": 10, "batch_size": 2, "max_seq_len": 64},
    }
    spec.update(overrides)
    return spec


def setup_distill(api, headers=None) -> dict:
    """A registered student and teacher and a dataset; returns a valid distill spec over them."""
    student = register_model(api, "student", headers)
    teacher = register_model(api, "teacher", headers)
    data = upload_dataset(api, headers=headers)
    return distill_spec(student["id"], teacher["id"], data["id"])


def insert_job(
    api,
    project_id: str | None = None,
    status: str = "running",
    kind: str = "distill",
    spec: dict | None = None,
    events: int = 0,
) -> str:
    with api.db() as session:
        job = Job(project_id=project_id or api.project_id, kind=kind, status=status, spec=spec or {}, total_steps=100)
        session.add(job)
        session.flush()
        for i in range(events):
            lifecycle.add_event(session, job.id, "progress", f"step {i}", {"step": i})
        return job.id


def add_events(api, job_id: str, n: int, kind: str = "progress") -> list[int]:
    with api.db() as session:
        rows = [lifecycle.add_event(session, job_id, kind, f"{kind} {i}", {"i": i}) for i in range(n)]
        session.flush()
        return [r.id for r in rows]


def finish_job(api, job_id: str, status: str = "succeeded") -> None:
    with api.db() as session:
        assert lifecycle.finish(session, job_id, None, status)


def insert_artifact(
    api,
    job_id: str,
    content: bytes,
    name: str = "adapters.safetensors",
    path: Path | None = None,
    project_id: str | None = None,
) -> str:
    root = Path(api.settings.artifact_root)
    if path is None:
        path = root / "jobs" / job_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with api.db() as session:
        row = Artifact(
            id=new_id("art"),
            project_id=project_id or api.project_id,
            job_id=job_id,
            name=name,
            path=str(path),
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            content_type="application/octet-stream",
        )
        session.add(row)
        return row.id


def count(api, model) -> int:
    from sqlalchemy import func, select

    with api.db() as session:
        return session.scalar(select(func.count()).select_from(model))
