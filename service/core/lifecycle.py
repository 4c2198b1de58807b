"""A job's life in the database, shared by the API and the workers (no HTTP, no MLX here).

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
                         │  ▲ lease expired (worker died): back to queued, resumed from its checkpoint
                         ▼  │
                  cancel_requested ──▶ cancelled

The row is written before any message is sent; a worker runs a job only after `claim` wins the row with a
lease (compare-and-set in one UPDATE), renews the lease by heartbeat, and loses the job if it stops renewing.
`sweep` turns expired leases back into queued jobs and re-sends jobs whose message never reached a worker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import CursorResult, Update, and_, or_, select, update
from sqlalchemy.orm import Session

from distillery_contract.jobs import (  # noqa: F401 (the statuses are re-exported: `lifecycle.QUEUED`)
    ACTIVE,
    BASELINE_LABEL,
    CANCEL_REQUESTED,
    CANCELLED,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TOP_K,
    DISTILLED_LABEL,
    FAILED,
    INTERNAL_ERROR,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
)
from distillery_contract.specs import CompareSpec, compare_arms
from service.core.db.models import Job, JobDependency, JobEvent, utcnow
from service.core.references import Reference, spec_references


def _rows_updated(session: Session, statement: Update) -> int:
    """Run an UPDATE (without RETURNING) in the session: how many rows it changed."""
    result = session.execute(statement)
    # typed as a plain `Result`, but for an UPDATE `Session.execute` returns the `CursorResult`, the one with the
    # row count (as SQLAlchemy documents; its typing lacks that overload, sqlalchemy/sqlalchemy#9185)
    assert isinstance(result, CursorResult)
    return result.rowcount


def add_event(session: Session, job_id: str, kind: str, message: str, data: dict | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, message=message, data=data or {})
    session.add(event)
    return event


def teacher_cache_key(teacher_model_id: str, dataset_id: str, top_k: int, max_seq_len: int) -> str:
    raw = json.dumps([teacher_model_id, dataset_id, top_k, max_seq_len])
    return hashlib.sha256(raw.encode()).hexdigest()


def find_cache_job(
    session: Session, project_id: str, teacher: str, dataset: str, top_k: int, max_seq_len: int
) -> Job | None:
    """The project's live or finished teacher_cache job for these inputs (the newest), if any."""
    key = teacher_cache_key(teacher, dataset, top_k, max_seq_len)
    return session.scalars(
        select(Job)
        .where(
            Job.project_id == project_id,
            Job.kind == "teacher_cache",
            Job.cache_key == key,
            Job.status.in_((QUEUED, RUNNING, SUCCEEDED)),
        )
        .order_by(Job.id.desc())
    ).first()


def get_or_create_cache_job(
    session: Session, project_id: str, teacher: str, dataset: str, top_k: int, max_seq_len: int
) -> tuple[Job, bool]:
    """The project's teacher_cache job for these inputs: an existing live or finished one, or a new one."""
    key = teacher_cache_key(teacher, dataset, top_k, max_seq_len)
    existing = find_cache_job(session, project_id, teacher, dataset, top_k, max_seq_len)
    if existing:
        return existing, False
    spec = {"teacher": teacher, "data": dataset, "top_k": top_k, "max_seq_len": max_seq_len}
    job = Job(project_id=project_id, kind="teacher_cache", spec=spec, cache_key=key)
    session.add(job)
    session.flush()
    add_event(session, job.id, "created", "teacher_cache job created")
    return job, True


def create_job(
    session: Session,
    project_id: str,
    kind: str,
    spec: dict,
    parent_id: str | None = None,
    total_steps: int | None = None,
) -> tuple[Job, list[Job]]:
    """Insert a job (and, for an offline distill, its teacher_cache jobs; with `evaluate`, its benchmark child;
    for a compare, one distill child per arm, which it waits for). Returns (job, the new jobs that may start at
    once)."""
    job = Job(project_id=project_id, kind=kind, spec=spec, parent_id=parent_id, total_steps=total_steps)
    if kind == "teacher_cache":  # submitted by hand: offline distill jobs on the same inputs reuse it
        job.cache_key = teacher_cache_key(
            spec["teacher"],
            spec["data"],
            spec.get("top_k", DEFAULT_TOP_K),
            spec.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
        )
    session.add(job)
    session.flush()
    add_event(session, job.id, "created", f"{kind} job created")
    _wait_for_used_jobs(
        session, job, [r for r in spec_references(kind, spec) if not r.field.startswith("spec.evaluate.")]
    )
    if kind == "distill" and spec.get("evaluate"):
        child = Job(project_id=project_id, kind="benchmark", spec=evaluation_spec(job.id, spec), parent_id=job.id)
        session.add(child)
        session.flush()
        _wait_for_used_jobs(session, child, spec_references("benchmark", child.spec))
        add_event(session, child.id, "created", f"benchmark job created to evaluate distill job {job.id}")
        add_event(
            session, job.id, "evaluation", f"benchmark job {child.id} will evaluate the result", {"job_id": child.id}
        )
    if kind == "compare":
        return job, _compare_arms(session, project_id, job)
    new_caches = []
    if kind == "distill" and spec.get("teacher_mode", "offline") == "offline":
        training, loss = spec.get("training", {}), spec.get("loss", {})
        datasets = [spec["data"]["train"]] + (
            [spec["data"]["valid"]] if isinstance(spec["data"].get("valid"), str) else []
        )
        for teacher in spec["teachers"]:
            for ds in datasets:
                cache_job, created = get_or_create_cache_job(
                    session,
                    project_id,
                    teacher["model"],
                    ds,
                    loss.get("top_k", DEFAULT_TOP_K),
                    training.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
                )
                session.add(JobDependency(job_id=job.id, depends_on_id=cache_job.id))
                if created:
                    new_caches.append(cache_job)
        session.flush()
    return job, new_caches


def _compare_arms(session: Session, project_id: str, job: Job) -> list[Job]:
    """A compare job's arms: a distill child each (with its benchmark child when the base evaluates), all of
    which the compare job waits for. Returns the new jobs that may start at once (caches, ready arms)."""
    startable: list[Job] = []
    made = []
    for name, arm_spec in compare_arms(CompareSpec.model_validate(job.spec)):
        arm, caches = create_job(session, project_id, "distill", arm_spec, job.id, arm_spec["training"]["steps"])
        add_event(session, arm.id, "arm", f"arm {name!r} of compare job {job.id}", {"arm": name, "compare": job.id})
        waited = [arm, *session.scalars(select(Job).where(Job.parent_id == arm.id)).all()]  # and its benchmark
        for other in waited:
            session.add(JobDependency(job_id=job.id, depends_on_id=other.id))
        startable += caches + ([arm] if readiness(session, arm) == "ready" else [])
        made.append({"name": name, "job_id": arm.id})
    session.flush()
    names = ", ".join(f"{m['name']} ({m['job_id']})" for m in made)
    add_event(session, job.id, "arms", f"{len(made)} arms: {names}", {"arms": made})
    return startable


def _wait_for_used_jobs(session: Session, job: Job, refs: Iterable[Reference]) -> None:
    """A job that uses another job's output (an adapter, a student) depends on it until it has succeeded."""
    for other_id in dict.fromkeys(r.id for r in refs if r.target == "job"):
        other = session.get(Job, other_id)
        if other is not None and other.status != SUCCEEDED:
            session.add(JobDependency(job_id=job.id, depends_on_id=other.id))
    session.flush()


def evaluation_spec(job_id: str, spec: dict) -> dict:
    """The benchmark a distill spec's `evaluate` asks for: its first teacher as the reference, the student before
    training, the distilled student, and any further candidates."""
    ev = spec["evaluate"]
    candidates = (
        ([{"label": BASELINE_LABEL, "student_of": job_id}] if ev.get("baseline", True) else [])
        + [{"label": DISTILLED_LABEL, "adapter": job_id}]
        + list(ev.get("candidates") or [])
    )
    out = {
        "reference": spec["teachers"][0]["model"],
        "candidates": candidates,
        "data": ev["data"],
        "max_seq_len": ev.get("max_seq_len") or spec.get("training", {}).get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
    }
    out.update({k: ev[k] for k in ("batch_size", "max_examples", "speed", "samples") if ev.get(k) is not None})
    return out


def dependencies(session: Session, job_id: str) -> list[Job]:
    return list(
        session.scalars(
            select(Job).join(JobDependency, JobDependency.depends_on_id == Job.id).where(JobDependency.job_id == job_id)
        )
    )


def readiness(session: Session, job: Job) -> str:
    """'ready', 'waiting' (a dependency still runs) or 'blocked' (a dependency failed or was cancelled)."""
    deps = dependencies(session, job.id)
    if any(d.status in (FAILED, CANCELLED) for d in deps):
        return "blocked"
    return "ready" if all(d.status == SUCCEEDED for d in deps) else "waiting"


def fail_blocked(session: Session, job: Job) -> None:
    bad = next(d for d in dependencies(session, job.id) if d.status in (FAILED, CANCELLED))
    reason = f"{bad.kind} job {bad.id} {bad.status}" + (f": {bad.error_message}" if bad.error_message else "")
    code = bad.error_code if bad.status == FAILED and bad.error_code else INTERNAL_ERROR
    finish(session, job.id, None, FAILED, error_code=code, error_message=f"dependency failed — {reason}")


def mark_enqueued(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def take_for_sending(session: Session, job_id: str, resend_after_seconds: int, now: datetime | None = None) -> bool:
    """Whether this sweeper is the one to send the job now: a conditional UPDATE of `enqueued_at`, so of several
    sweepers that found the same job due, exactly one sends it (a send that fails is undone by `unsend`)."""
    now = now or utcnow()
    stale = now - timedelta(seconds=resend_after_seconds)
    return bool(
        _rows_updated(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale))
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False),
        )
    )


def unsend(session: Session, job_id: str) -> None:
    """The send failed: the job counts as never sent, so the next sweep sends it at once."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False)
    )


def forget_sends(session: Session) -> int:
    """The broker lost its queue (it restarted empty): every queued job counts as never sent. Returns how many."""
    return _rows_updated(
        session,
        update(Job)
        .where(Job.status == QUEUED, Job.enqueued_at.is_not(None))
        .values(enqueued_at=None)
        .execution_options(synchronize_session=False),
    )


def claim(session: Session, job_id: str, owner: str, lease_seconds: int) -> Job | None:
    """Take the job if it is queued (or its lease expired): one atomic UPDATE, so only one worker wins."""
    now = utcnow()
    won = _rows_updated(
        session,
        update(Job)
        .where(Job.id == job_id, or_(Job.status == QUEUED, and_(Job.status.in_(ACTIVE), Job.lease_expires_at < now)))
        .values(
            status=RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False),
    )
    if not won:
        return None
    job = session.get_one(Job, job_id, populate_existing=True)  # the row this transaction just updated
    if job.cancel_requested:
        finish(session, job_id, owner, CANCELLED, error_message="cancelled before it started")
        return None
    if job.started_at is None:
        job.started_at = now
    add_event(
        session,
        job_id,
        "started" if job.attempts == 1 else "resumed",
        f"attempt {job.attempts} on {owner}",
        {"attempt": job.attempts, "worker": owner},
    )
    return job


def fence(session: Session, job_id: str, owner: str) -> bool:
    """Whether `owner` still holds the job's lease, asked as a write: the row stays locked until the caller's
    transaction ends, so nothing the caller writes in it can land after another worker claimed the job."""
    return bool(
        _rows_updated(
            session,
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False),
        )
    )


def heartbeat(session: Session, job_id: str, owner: str, lease_seconds: int) -> tuple[bool, bool]:
    """Renew the lease. Returns (still ours, cancel requested)."""
    now = utcnow()
    renewed = _rows_updated(
        session,
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False),
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return bool(renewed), bool(cancel)


def finish(
    session: Session,
    job_id: str,
    owner: str | None,
    status: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    summary: dict | None = None,
) -> bool:
    """Record the outcome (only by the lease owner, when one is given). Returns whether it was recorded."""
    cond = [Job.id == job_id, Job.status.not_in(TERMINAL)]
    if owner is not None:
        cond.append(Job.lease_owner == owner)
    values = dict(
        status=status,
        finished_at=utcnow(),
        lease_owner=None,
        lease_expires_at=None,
        error_code=error_code,
        error_message=error_message,
    )
    if summary is not None:
        values["summary"] = summary
    done = _rows_updated(
        session, update(Job).where(*cond).values(**values).execution_options(synchronize_session=False)
    )
    if done:
        add_event(
            session,
            job_id,
            status,
            error_message or status,
            {"error": {"code": error_code, "message": error_message}} if error_code else {},
        )
    return bool(done)


def release(session: Session, job_id: str, owner: str, reason: str) -> bool:
    """The owner gives a running job back unfinished (its worker is shutting down): queued again, to be resumed
    from its checkpoint by whichever worker takes it next (the sweepers send it, `enqueued_at` is cleared).
    A job whose cancellation was requested meanwhile is cancelled instead."""
    ours = (Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
    if session.scalar(select(Job.cancel_requested).where(*ours)):
        return finish(session, job_id, owner, CANCELLED, error_message="cancelled")
    done = _rows_updated(
        session,
        update(Job)
        .where(*ours)
        .values(status=QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    if done:
        add_event(session, job_id, "released", reason)
    return bool(done)


def request_cancel(session: Session, job: Job) -> None:
    """Queued: cancelled at once. Running: the worker sees the flag at its next step and stops. A compare job's
    arms are its work: they are cancelled with it."""
    if job.status in TERMINAL:
        return
    if job.kind == "compare":
        for arm in session.scalars(select(Job).where(Job.parent_id == job.id)).all():
            request_cancel(session, arm)
    job.cancel_requested = True
    if job.status == QUEUED:
        finish(session, job.id, None, CANCELLED, error_message="cancelled before it started")
    else:
        job.status = CANCEL_REQUESTED
        add_event(session, job.id, "cancel_requested", "cancellation requested")


def dependents_ready(session: Session, job_id: str) -> list[str]:
    """Queued jobs that waited on `job_id` and can run now."""
    waiting = session.scalars(
        select(Job)
        .join(JobDependency, JobDependency.job_id == Job.id)
        .where(JobDependency.depends_on_id == job_id, Job.status == QUEUED)
    ).all()
    return _ready_ids(session, waiting)


def _ready_ids(session: Session, queued: Sequence[Job]) -> list[str]:
    """Ids of the queued jobs whose dependencies all succeeded; the ones a failed dependency blocks fail now."""
    ready = []
    for job in queued:
        state = readiness(session, job)
        if state == "ready":
            ready.append(job.id)
        elif state == "blocked":
            fail_blocked(session, job)
    return ready


def sweep(session: Session, resend_after_seconds: int, now: datetime | None = None) -> list[str]:
    """Jobs to (re)send: lost ones (lease expired) go back to queued; ready queued jobs never sent, or sent
    long ago and still not taken (a message lost with the broker), are sent again. Duplicates are harmless."""
    now = now or utcnow()
    lost = session.scalars(select(Job.id).where(Job.status.in_(ACTIVE), Job.lease_expires_at < now)).all()
    for job_id in lost:
        # conditional, so a job another worker claimed since the SELECT (claim takes expired leases too) stays
        # with it; on PostgreSQL concurrent sweepers serialise on the row and only one of them requeues it
        still_lost = (Job.id == job_id, Job.status.in_(ACTIVE), Job.lease_expires_at < now)
        if session.scalar(select(Job.cancel_requested).where(*still_lost)):
            finish(session, job_id, None, CANCELLED, error_message="cancelled (its worker stopped)")
            continue
        requeued = _rows_updated(
            session,
            update(Job)
            .where(*still_lost)
            .values(status=QUEUED, lease_owner=None, lease_expires_at=None, enqueued_at=None, updated_at=now)
            .execution_options(synchronize_session=False),
        )
        if requeued:
            add_event(session, job_id, "requeued", f"lease of {job_id} expired (worker lost); queued again to resume")
    session.flush()
    stale = now - timedelta(seconds=resend_after_seconds)
    queued = session.scalars(
        select(Job).where(Job.status == QUEUED, or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale))
    ).all()
    return _ready_ids(session, queued)
