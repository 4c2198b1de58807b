"""Jobs as the API sees them: create (validated specs whose ids all belong to the caller's project), list,
get, cancel, and the job's events, metrics, checkpoints and artifacts.

Creation writes the job (and any teacher_cache jobs it needs, via lifecycle.create_job) in one transaction,
commits, and only then rings the broker. A broker that is down fails nothing: the job stays queued with
`enqueued_at` null and the workers' sweeper sends it later.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from distillery_contract.records import TRAINABLE_FORMATS
from service import queue
from service.api import idempotency
from service.api.idempotency import IdempotencyKey, Replay
from service.api.pagination import page
from service.api.problems import Problem, from_field_errors, invalid, not_found
from service.api.schemas import (
    JOB_KINDS,
    JOB_STATUSES,
    ArtifactList,
    CheckpointList,
    EventPage,
    JobCreate,
    JobOut,
    JobPage,
    MetricList,
    artifact_out,
    checkpoint_out,
    event_out,
    job_out,
    metric_out,
    to_json,
)
from service.db.models import ID_PATTERN, Artifact, Checkpoint, Dataset, Job, JobEvent, Model, StepMetric
from service.jobs import lifecycle
from service.jobs.references import Reference, spec_references

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- create


def create_job(
    session: Session, enqueuer: Enqueuer, project_id: str, body: JobCreate, idem: IdempotencyKey | None
) -> tuple[int, dict] | Replay:
    replay = idempotency.find(session, project_id, idem)
    if replay is not None:
        return replay
    spec = body.spec.model_dump(mode="json")
    errors = [e for ref in spec_references(body.kind, spec) if (e := _check_reference(session, project_id, ref))]
    if body.parent_id is not None:
        parent = session.get(Job, body.parent_id)
        if parent is None or parent.project_id != project_id:
            errors.append({"field": "parent_id", "message": f"unknown job id {body.parent_id!r}"})
    if errors:
        raise from_field_errors(errors)

    total_steps = spec["training"]["steps"] if body.kind == "distill" else None
    job, new_caches = lifecycle.create_job(session, project_id, body.kind, spec, body.parent_id, total_steps)
    ready = lifecycle.readiness(session, job) == "ready"
    response = to_json(job_out(job, []))
    idempotency.remember(session, project_id, idem, 201, response)
    replay = idempotency.commit(session, project_id, idem)
    if replay is not None:
        return replay
    enqueuer.enqueue(session, [c.id for c in new_caches] + ([job.id] if ready else []))
    return 201, response


class Enqueuer:
    """Rings the broker for new jobs. After a failed send it stays quiet for `backoff_seconds`, so while the
    broker is down requests do not each wait for a connection timeout; the sweeper sends what was skipped."""

    def __init__(self, celery: Celery, backoff_seconds: float = 15.0) -> None:
        self.celery = celery
        self.backoff_seconds = backoff_seconds
        self._quiet_until = 0.0

    def enqueue(self, session: Session, job_ids: list[str]) -> int:
        """Send the jobs, marking each one sent; stop at the first failure. Returns how many were sent."""
        sent = 0
        for job_id in job_ids:
            if time.monotonic() < self._quiet_until or not queue.send(job_id, self.celery):
                self._quiet_until = max(self._quiet_until, time.monotonic() + self.backoff_seconds)
                log.info("broker unavailable: %d job(s) left queued for the sweeper", len(job_ids) - sent)
                break
            lifecycle.mark_enqueued(session, job_id)
            session.commit()
            sent += 1
        return sent


_DATASET_FORMATS: dict[str, tuple[str, ...]] = {  # by field (in a benchmark spec or a distill's `evaluate`)
    "spec.data.mcq": ("mcq",),
    "spec.data.preference": ("preference",),
    "spec.evaluate.data.mcq": ("mcq",),
    "spec.evaluate.data.preference": ("preference",),
}

ID_RE = re.compile(ID_PATTERN)


def _check_reference(session: Session, project_id: str, ref: Reference) -> dict[str, Any] | None:
    """The error for one id of the spec, or None when it names a usable object of the project."""
    if not ID_RE.fullmatch(ref.id):  # never handed to the database (a NUL is a DataError in PostgreSQL)
        shown = repr(ref.id[:80])
        return {"field": ref.field, "message": f"{shown} is not an id{_path_hint(ref.id, ref.target + 's')}"}
    if ref.target == "model":
        row = session.get(Model, ref.id)
        if row is None or row.project_id != project_id:
            return {"field": ref.field, "message": f"unknown model id {ref.id!r}{_path_hint(ref.id, 'models')}"}
        return None
    if ref.target == "dataset":
        row = session.get(Dataset, ref.id)
        if row is None or row.project_id != project_id or row.deleted_at is not None:
            return {"field": ref.field, "message": f"unknown dataset id {ref.id!r}{_path_hint(ref.id, 'datasets')}"}
        allowed = _DATASET_FORMATS.get(ref.field, TRAINABLE_FORMATS)
        if row.format not in allowed:
            return {
                "field": ref.field,
                "message": f"dataset {ref.id} is in format {row.format!r}; this needs {' or '.join(allowed)}",
            }
        return None
    row = session.get(Job, ref.id)  # an adapter or a student: the output of a distill job (the new job waits
    if row is None or row.project_id != project_id:  # for it when it has not finished)
        return {"field": ref.field, "message": f"unknown job id {ref.id!r}{_path_hint(ref.id, 'jobs')}"}
    if row.kind != "distill" or row.status in (lifecycle.FAILED, lifecycle.CANCELLED):
        return {
            "field": ref.field,
            "message": f"job {ref.id} is a {row.status} {row.kind} job; this needs a distill job that "
            "succeeded or is still to run",
        }
    return None


def _path_hint(value: str, resource: str) -> str:
    if "/" in value or "\\" in value or value.startswith((".", "~")):
        return f" (the API takes ids, not paths: register it with POST /v1/{resource} and use its id)"
    return ""


# --------------------------------------------------------------------------------------------- read


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    row = session.get(Job, job_id)
    if row is None or row.project_id != project_id:
        raise not_found("job", job_id)
    return row


def _artifacts_by_job(session: Session, job_ids: list[str]) -> dict[str, list[Artifact]]:
    out: dict[str, list[Artifact]] = defaultdict(list)
    if job_ids:
        for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.id)):
            out[a.job_id].append(a)
    return out


def get_job_out(session: Session, project_id: str, job_id: str) -> JobOut:
    row = get_job(session, project_id, job_id)
    return job_out(row, _artifacts_by_job(session, [row.id])[row.id])


def list_jobs(
    session: Session,
    project_id: str,
    status: str | None,
    kind: str | None,
    limit: int,
    after: str | None,
    parent_id: str | None = None,
) -> JobPage:
    stmt = select(Job).where(Job.project_id == project_id)
    if parent_id is not None:
        stmt = stmt.where(Job.parent_id == parent_id)
    if status is not None:
        if status not in JOB_STATUSES:
            raise invalid("status", f"unknown status {status!r}; expected one of {', '.join(JOB_STATUSES)}")
        stmt = stmt.where(Job.status == status)
    if kind is not None:
        if kind not in JOB_KINDS:
            raise invalid("kind", f"unknown kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
        stmt = stmt.where(Job.kind == kind)
    rows, has_more = page(session, stmt, Job.id, limit, after)
    artifacts = _artifacts_by_job(session, [r.id for r in rows])
    return JobPage(data=[job_out(r, artifacts[r.id]) for r in rows], has_more=has_more)


def cancel_job(
    session: Session, project_id: str, job_id: str, idem: IdempotencyKey | None
) -> tuple[int, dict] | Replay:
    """Queued: cancelled now. Running: cancel_requested until the worker stops at its next step."""
    replay = idempotency.find(session, project_id, idem)
    if replay is not None:
        return replay
    row = get_job(session, project_id, job_id)
    if row.status in (lifecycle.SUCCEEDED, lifecycle.FAILED):
        raise Problem(409, f"job {job_id} already {row.status}; there is nothing to cancel")
    lifecycle.request_cancel(session, row)
    session.flush()
    session.refresh(row)
    body = to_json(job_out(row, _artifacts_by_job(session, [row.id])[row.id]))
    idempotency.remember(session, project_id, idem, 200, body)
    replay = idempotency.commit(session, project_id, idem)
    return replay if replay is not None else (200, body)


def delete_job_files(session: Session, artifact_root, project_id: str, job_id: str) -> dict[str, Any]:
    """Remove a finished job's folder (outputs, checkpoints, every attempt's files) to free disk space; its
    rows (events, metrics, summary) stay, its artifacts and checkpoints are gone. Refused while the job runs,
    while an unfinished job uses its output, and for teacher caches (shared by the server, kept by it)."""
    import shutil
    from pathlib import Path

    from service.artifacts.service import job_output_dir

    row = get_job(session, project_id, job_id)
    if row.status not in lifecycle.TERMINAL:
        raise Problem(409, f"job {job_id} is {row.status}; cancel it or wait for it to finish first")
    if row.kind == "teacher_cache":
        raise Problem(
            409,
            f"job {job_id} built a teacher cache, which the server shares and manages itself; "
            "there are no job files to delete",
        )
    live = session.scalars(
        select(Job).where(Job.project_id == project_id, Job.status.not_in(lifecycle.TERMINAL), Job.id != job_id)
    ).all()
    users = [
        j.id for j in live if any(r.target == "job" and r.id == job_id for r in spec_references(j.kind, j.spec or {}))
    ]
    users += [j.id for j in live if j.parent_id == job_id and j.id not in users]
    if users:
        raise Problem(
            409,
            f"job {job_id}'s files are used by unfinished job(s) {', '.join(users[:5])}; cancel "
            "them or wait for them to finish",
        )
    folder = job_output_dir(Path(artifact_root), row)
    freed = (
        sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) if folder.is_dir() else 0
    )
    removed = session.query(Artifact).filter(Artifact.job_id == job_id).delete(synchronize_session=False)
    session.query(Checkpoint).filter(Checkpoint.job_id == job_id).delete(synchronize_session=False)
    lifecycle.add_event(
        session,
        job_id,
        "files_deleted",
        f"the job's files were deleted ({freed} bytes)",
        {"freed_bytes": freed, "artifacts": removed},
    )
    session.commit()  # rows first: a crash between the two leaves files without rows, never rows without files
    shutil.rmtree(folder, ignore_errors=True)
    return {"id": job_id, "freed_bytes": freed, "artifacts_removed": removed}


def list_events(session: Session, project_id: str, job_id: str, after: int | None, limit: int) -> EventPage:
    get_job(session, project_id, job_id)
    rows, has_more = page(
        session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.id, limit, after, ascending=True
    )
    return EventPage(data=[event_out(r) for r in rows], has_more=has_more)


def job_states(session: Session, job_ids: set[str]) -> dict[str, dict]:
    """Each job's status, progress and summary, as sent in `state` stream messages. Read before the events:
    when a status is terminal, the events read next include the one that recorded it (same transaction)."""
    rows = session.execute(
        select(Job.id, Job.status, Job.progress_step, Job.total_steps, Job.eta_seconds, Job.summary).where(
            Job.id.in_(sorted(job_ids))
        )
    ).all()
    states = {}
    for row in rows:
        total = row.total_steps
        states[row.id] = {
            "status": row.status,
            "progress": {
                "step": row.progress_step,
                "total_steps": total,
                "eta_seconds": row.eta_seconds,
                "fraction": min(1.0, row.progress_step / total) if total else None,
            },
            "summary": dict(row.summary or {}),
        }
    return states


def events_after(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
        ).all()
    )


def list_metrics(session: Session, project_id: str, job_id: str, name: str | None) -> MetricList:
    get_job(session, project_id, job_id)
    stmt = select(StepMetric).where(StepMetric.job_id == job_id)
    if name:
        stmt = stmt.where(StepMetric.name == name)
    rows = session.scalars(stmt.order_by(StepMetric.name, StepMetric.step, StepMetric.id)).all()
    return MetricList(data=[metric_out(r) for r in rows])


def list_checkpoints(session: Session, project_id: str, job_id: str) -> CheckpointList:
    get_job(session, project_id, job_id)
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()
    return CheckpointList(data=[checkpoint_out(r) for r in rows])


def list_artifacts(session: Session, project_id: str, job_id: str) -> ArtifactList:
    get_job(session, project_id, job_id)
    return ArtifactList(data=[artifact_out(a) for a in _artifacts_by_job(session, [job_id])[job_id]])
