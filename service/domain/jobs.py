"""Jobs as the API sees them: create (validated specs whose ids all belong to the caller's project), list,
get, cancel, and the job's events, metrics, checkpoints and artifacts. No HTTP here: refusals are
service.core.errors', results are rows.

Creation writes the job (and any teacher_cache jobs it needs, via lifecycle.create_job) in the caller's
transaction; only once that is committed is the broker rung (service.core.transaction.after_commit). A broker that is
down fails nothing: the job stays queued with `enqueued_at` null and the workers' sweeper sends it later.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from distillery_contract.jobs import JOB_KINDS, JOB_STATUSES
from distillery_contract.records import TRAINABLE_FORMATS
from service.core import lifecycle, queue, transaction
from service.core.db.models import (
    ID_PATTERN,
    Artifact,
    Checkpoint,
    Dataset,
    Job,
    JobDependency,
    JobEvent,
    Model,
    StepMetric,
)
from service.core.errors import Conflict, FieldError, Invalid, InvalidFields, NotFound
from service.core.paging import Page, page
from service.core.references import Reference, job_ids, spec_references
from service.core.storage import folder_bytes, job_output_dir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- create


def create_job(
    session: Session, enqueuer: Enqueuer, project_id: str, kind: str, spec: dict[str, Any], parent_id: str | None
) -> Job:
    """A new job from a validated spec (`spec` as JSON values); sent to the broker once committed if it can
    start at once, with the teacher_cache jobs it needs."""
    errors = reference_errors(session, project_id, kind, spec)
    if parent_id is not None:
        parent = session.get(Job, parent_id)
        if parent is None or parent.project_id != project_id:
            errors.append({"field": "parent_id", "message": f"unknown job id {parent_id!r}"})
    if errors:
        raise InvalidFields(errors)

    total_steps = spec["training"]["steps"] if kind == "distill" else None
    job, new_caches = lifecycle.create_job(session, project_id, kind, spec, parent_id, total_steps)
    ready = [c.id for c in new_caches] + ([job.id] if lifecycle.readiness(session, job) == "ready" else [])
    transaction.after_commit(session, lambda: enqueuer.enqueue(session, ready))
    return job


def reference_errors(session: Session, project_id: str, kind: str, spec: dict[str, Any]) -> list[FieldError]:
    """One error for each id of the spec that does not name a usable object of the caller's project."""
    return [
        e
        for ref in spec_references(kind, spec)
        if (e := _check_reference(session, project_id, ref, _formats(kind, spec)))
    ]


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
    "spec.data.prompts": ("prompts", "completions", "chat"),
    "spec.evaluate.data.prompts": ("prompts", "completions", "chat"),
}

ID_RE = re.compile(ID_PATTERN)
PROMPTS_HINT = " (prompts alone train only with teacher_mode: on_policy, at on_policy.fraction 1 for the training data)"


def _formats(kind: str, spec: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """The dataset formats each field of the spec accepts: on-policy distillation also samples from prompts
    alone (the student writes every completion, so only with `on_policy.fraction` 1 for the training data). A
    comparison's fields are its base distill spec's, under `spec.base.`."""
    if kind == "compare":
        return {f"spec.base.{k.removeprefix('spec.')}": v for k, v in _formats("distill", spec["base"]).items()}
    if kind != "distill" or spec.get("teacher_mode") != "on_policy":
        return _DATASET_FORMATS
    fraction = (spec.get("on_policy") or {}).get("fraction", 1.0)
    train = TRAINABLE_FORMATS + ("prompts",) if fraction >= 1.0 else TRAINABLE_FORMATS
    return {**_DATASET_FORMATS, "spec.data.train": train, "spec.data.valid": TRAINABLE_FORMATS + ("prompts",)}


def _check_reference(
    session: Session, project_id: str, ref: Reference, formats: dict[str, tuple[str, ...]] = _DATASET_FORMATS
) -> FieldError | None:
    """The error for one id of the spec, or None when it names a usable object of the project."""
    if not ID_RE.fullmatch(ref.id):  # never handed to the database (a NUL is a DataError in PostgreSQL)
        shown = repr(ref.id[:80])
        return {"field": ref.field, "message": f"{shown} is not an id{_path_hint(ref.id, ref.target + 's')}"}
    if ref.target == "model":
        model = session.get(Model, ref.id)
        if model is None or model.project_id != project_id:
            return {"field": ref.field, "message": f"unknown model id {ref.id!r}{_path_hint(ref.id, 'models')}"}
        return None
    if ref.target == "dataset":
        dataset = session.get(Dataset, ref.id)
        if dataset is None or dataset.project_id != project_id or dataset.deleted_at is not None:
            return {"field": ref.field, "message": f"unknown dataset id {ref.id!r}{_path_hint(ref.id, 'datasets')}"}
        allowed = formats.get(ref.field, TRAINABLE_FORMATS)
        if dataset.format not in allowed:
            hint = PROMPTS_HINT if dataset.format == "prompts" else ""
            return {
                "field": ref.field,
                "message": f"dataset {ref.id} is in format {dataset.format!r}; this needs {' or '.join(allowed)}{hint}",
            }
        return None
    job = session.get(Job, ref.id)  # an adapter or a student: the output of a distill job (the new job waits
    if job is None or job.project_id != project_id:  # for it when it has not finished)
        return {"field": ref.field, "message": f"unknown job id {ref.id!r}{_path_hint(ref.id, 'jobs')}"}
    if job.kind != "distill" or job.status in (lifecycle.FAILED, lifecycle.CANCELLED):
        return {
            "field": ref.field,
            "message": f"job {ref.id} is a {job.status} {job.kind} job; this needs a distill job that "
            "succeeded or is still to run",
        }
    return None


def _path_hint(value: str, resource: str) -> str:
    if "/" in value or "\\" in value or value.startswith((".", "~")):
        return f" (the API takes ids, not paths: register it with POST /v1/{resource} and use its id)"
    return ""


# --------------------------------------------------------------------------------------------- read


class JobView(NamedTuple):
    """A job, its artifacts and (while queued) the unfinished jobs it waits on: what the API shows of it."""

    job: Job
    artifacts: list[Artifact]
    waiting_on: list[dict[str, Any]]


def waiting_on(session: Session, rows: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """For each queued job of `rows` (`(id, status)` pairs): the dependencies that have not succeeded yet (its
    teacher caches, the distill job whose output it uses) as `{id, kind, status, fraction}`, oldest first; one
    query for all of them."""
    queued = [job_id for job_id, status in rows if status == lifecycle.QUEUED]
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if not queued:
        return out
    found = session.execute(
        select(JobDependency.job_id, Job.id, Job.kind, Job.status, Job.progress_step, Job.total_steps)
        .join(Job, Job.id == JobDependency.depends_on_id)
        .where(JobDependency.job_id.in_(queued), Job.status != lifecycle.SUCCEEDED)
        .order_by(Job.id)
    ).all()
    for job_id, dep_id, kind, status, step, total in found:
        fraction = min(1.0, step / total) if total else None
        out[job_id].append({"id": dep_id, "kind": kind, "status": status, "fraction": fraction})
    return out


def get_job(session: Session, project_id: str, job_id: str) -> Job:
    row = session.get(Job, job_id)
    if row is None or row.project_id != project_id:
        raise NotFound("job", job_id)
    return row


def _artifacts_by_job(session: Session, job_ids: list[str]) -> dict[str, list[Artifact]]:
    out: dict[str, list[Artifact]] = defaultdict(list)
    if job_ids:
        for a in session.scalars(select(Artifact).where(Artifact.job_id.in_(job_ids)).order_by(Artifact.id)):
            out[a.job_id].append(a)
    return out


def job_view(session: Session, row: Job) -> JobView:
    return JobView(
        row, _artifacts_by_job(session, [row.id])[row.id], waiting_on(session, [(row.id, row.status)])[row.id]
    )


def get_job_view(session: Session, project_id: str, job_id: str) -> JobView:
    return job_view(session, get_job(session, project_id, job_id))


def list_jobs(
    session: Session,
    project_id: str,
    status: str | None,
    kind: str | None,
    limit: int,
    after: str | None,
    parent_id: str | None = None,
) -> Page[JobView]:
    stmt = select(Job).where(Job.project_id == project_id)
    if parent_id is not None:
        stmt = stmt.where(Job.parent_id == parent_id)
    if status is not None:
        if status not in JOB_STATUSES:
            raise Invalid("status", f"unknown status {status!r}; expected one of {', '.join(JOB_STATUSES)}")
        stmt = stmt.where(Job.status == status)
    if kind is not None:
        if kind not in JOB_KINDS:
            raise Invalid("kind", f"unknown kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
        stmt = stmt.where(Job.kind == kind)
    rows = page(session, stmt, Job.id, limit, after)
    artifacts = _artifacts_by_job(session, [r.id for r in rows.items])
    waiting = waiting_on(session, [(r.id, r.status) for r in rows.items])
    return Page([JobView(r, artifacts[r.id], waiting[r.id]) for r in rows.items], rows.has_more)


def cancel_job(session: Session, project_id: str, job_id: str) -> JobView:
    """Queued: cancelled now. Running: cancel_requested until the worker stops at its next step."""
    row = get_job(session, project_id, job_id)
    if row.status in (lifecycle.SUCCEEDED, lifecycle.FAILED):
        raise Conflict(f"job {job_id} already {row.status}; there is nothing to cancel")
    lifecycle.request_cancel(session, row)
    session.flush()
    session.refresh(row)
    return job_view(session, row)


@dataclass(frozen=True)
class FilesDeleted:
    id: str
    freed_bytes: int
    artifacts_removed: int


def delete_job_files(session: Session, artifact_root: Path, project_id: str, job_id: str) -> FilesDeleted:
    """Remove a finished job's folder (outputs, checkpoints, every attempt's files) to free disk space; its
    rows (events, metrics, summary) stay, its artifacts and checkpoints are gone. Refused while the job runs,
    while an unfinished job uses its output, and for teacher caches (shared by the server, kept by it). The
    folder goes once the rows are committed: a crash between the two leaves files without rows, never rows
    without files."""
    row = get_job(session, project_id, job_id)
    if row.status not in lifecycle.TERMINAL:
        raise Conflict(f"job {job_id} is {row.status}; cancel it or wait for it to finish first")
    if row.kind == "teacher_cache":
        raise Conflict(
            f"job {job_id} built a teacher cache, which the server shares and manages itself; "
            "there are no job files to delete"
        )
    live = session.scalars(
        select(Job).where(Job.project_id == project_id, Job.status.not_in(lifecycle.TERMINAL), Job.id != job_id)
    ).all()
    users = [j.id for j in live if job_id in job_ids(j.kind, j.spec or {})]
    users += [j.id for j in live if j.parent_id == job_id and j.id not in users]
    if users:
        raise Conflict(
            f"job {job_id}'s files are used by unfinished job(s) {', '.join(users[:5])}; cancel "
            "them or wait for them to finish"
        )
    folder = job_output_dir(Path(artifact_root), row)
    freed = folder_bytes(folder)
    removed = session.query(Artifact).filter(Artifact.job_id == job_id).delete(synchronize_session=False)
    session.query(Checkpoint).filter(Checkpoint.job_id == job_id).delete(synchronize_session=False)
    lifecycle.add_event(
        session,
        job_id,
        "files_deleted",
        f"the job's files were deleted ({freed} bytes)",
        {"freed_bytes": freed, "artifacts": removed},
    )
    transaction.after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))
    return FilesDeleted(id=job_id, freed_bytes=freed, artifacts_removed=removed)


def list_events(session: Session, project_id: str, job_id: str, after: int | None, limit: int) -> Page[JobEvent]:
    get_job(session, project_id, job_id)
    return page(session, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.id, limit, after, ascending=True)


def job_states(session: Session, job_ids: set[str]) -> dict[str, dict]:
    """Each job's status, progress and summary, as sent in `state` stream messages. Read before the events:
    when a status is terminal, the events read next include the one that recorded it (same transaction)."""
    rows = session.execute(
        select(Job.id, Job.status, Job.progress_step, Job.total_steps, Job.eta_seconds, Job.summary).where(
            Job.id.in_(sorted(job_ids))
        )
    ).all()
    states = {}
    waiting = waiting_on(session, [(row.id, row.status) for row in rows])
    for row in rows:
        total = row.total_steps
        states[row.id] = {
            "waiting_on": waiting[row.id],
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


def list_metrics(session: Session, project_id: str, job_id: str, name: str | None) -> list[StepMetric]:
    get_job(session, project_id, job_id)
    stmt = select(StepMetric).where(StepMetric.job_id == job_id)
    if name:
        stmt = stmt.where(StepMetric.name == name)
    return list(session.scalars(stmt.order_by(StepMetric.name, StepMetric.step, StepMetric.id)).all())


def list_checkpoints(session: Session, project_id: str, job_id: str) -> list[Checkpoint]:
    get_job(session, project_id, job_id)
    return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def list_artifacts(session: Session, project_id: str, job_id: str) -> list[Artifact]:
    get_job(session, project_id, job_id)
    return _artifacts_by_job(session, [job_id])[job_id]
