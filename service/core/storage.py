"""Artifact rows and files, shared by the worker (which registers what a run wrote) and the API (which
serves them). No HTTP here.

Every artifact file lies under the artifact root; `Artifact.path` is stored absolute, and whatever is stored
is resolved again and checked to be inside the root before a byte is served.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.db.models import Artifact

CHUNK = 1 << 20
DEFAULT_EXCLUDE = ("checkpoints/",)  # resumable training state, not a deliverable
CONTENT_TYPES = {
    ".safetensors": "application/octet-stream",
    ".jsonl": "application/jsonl",
    ".json": "application/json",
    ".gguf": "application/octet-stream",
}


class JobIds(Protocol):
    """A job's id and its project's, all that placing its files and registering its artifacts needs: a `Job` row,
    or what a worker read of one (`worker.runs.JobInfo`)."""

    @property
    def id(self) -> str: ...

    @property
    def project_id(self) -> str: ...


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (links not followed: what deleting it frees); 0 when it is missing."""
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def job_output_dir(artifact_root: Path, job: JobIds) -> Path:
    """Where a job's outputs belong: `<artifact_root>/jobs/<project id>/<job id>/`."""
    return Path(artifact_root).expanduser().resolve() / "jobs" / job.project_id / job.id


def content_type_for(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(artifact_root: Path, stored: str) -> Path | None:
    """The stored path (absolute, or relative to the root) resolved, if it is a file inside the root."""
    root = Path(artifact_root).expanduser().resolve()
    path = Path(stored)
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def register_artifact(
    session: Session,
    job: JobIds,
    file: Path,
    artifact_root: Path,
    *,
    name: str | None = None,
    content_type: str | None = None,
) -> Artifact:
    """Record one file of a job (hashing it). `name` defaults to the file name; registering the same name
    again (a resumed run rewrote it) updates the row instead of adding another."""
    root = Path(artifact_root).expanduser().resolve()
    path = Path(file).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"artifact {path} is outside the artifact root {root}")
    name = name or path.name
    row = session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name)).first()
    if row is None:
        row = Artifact(project_id=job.project_id, job_id=job.id, name=name)
        session.add(row)
    row.path = str(path)
    row.size_bytes = path.stat().st_size
    row.sha256 = file_sha256(path)
    row.content_type = content_type or content_type_for(name)
    session.flush()
    return row


def register_output_dir(
    session: Session, job: JobIds, out_dir: Path, artifact_root: Path, exclude: Iterable[str] = DEFAULT_EXCLUDE
) -> list[Artifact]:
    """Record every file under `out_dir` as an artifact named by its relative path (`student/config.json`),
    except those under an excluded prefix."""
    out_dir = Path(out_dir).resolve()
    prefixes = tuple(exclude)
    rows: list[Artifact] = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel.startswith(prefixes) or any(part.startswith(".") for part in Path(rel).parts):
            continue
        rows.append(register_artifact(session, job, path, artifact_root, name=rel))
    return rows
