"""`distillery.run_job(job_id)`: run one job, with the database as the source of truth.

A message only says "look at this job". The task claims the row (one atomic UPDATE with a lease); a job that
is not claimable — already running elsewhere, finished, a duplicate or late message — is left alone. While it
runs, `JobLease` keeps the lease alive and says when to stop. The outcome is written by the lease owner only:

    success      → artifacts registered, `succeeded` with the run's summary
    UserError    → `failed`, error code `user_error` and the engine's message
    Cancelled    → `cancelled` (checkpoint kept); or, when this worker is shutting down, released to the
                   queue to be resumed; or nothing at all when the lease was lost (another worker owns it)
    anything else→ `failed`, `internal_error` (the traceback is logged and kept in an `error` event)

Then the jobs that waited on this one are sent (or failed, if this one did not succeed).
This module imports no MLX: the engine is loaded inside the task, after `blas.enable()` ran at worker start.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillery_contract.jobs import INTERNAL_ERROR, RESOURCE
from service.core import lifecycle, queue
from service.core.db.models import Job
from service.core.db.session import session_scope
from service.core.settings import Settings, get_settings
from service.core.storage import job_output_dir, register_output_dir
from worker.lease import JobLease

if TYPE_CHECKING:  # for the annotations only: both are imported inside the task (worker.runs imports MLX)
    from worker.recorder import JobRecorder
    from worker.runs import JobInfo

log = logging.getLogger(__name__)

UNPUBLISHED = ("checkpoints/", "spec.json")  # resume state and the run's spec marker stay internal


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_job(job_id: str) -> None:
    settings = get_settings()
    if not _ready(job_id):
        return
    owner = owner_id()
    with session_scope() as session:
        job = lifecycle.claim(session, job_id, owner, settings.lease_seconds)
        # plain values only: nothing slow may run before the claim commits (the lease's clock is running)
        row = (
            {"kind": job.kind, "project_id": job.project_id, "spec": dict(job.spec), "attempts": job.attempts}
            if job
            else None
        )
    if row is None:
        log.info("job %s not claimable (taken, finished or cancelled): message ignored", job_id)
        _send_dependents(job_id)  # harmless when none; needed when claim just cancelled it
        return
    log.info("job %s (%s) claimed by %s, attempt %d", job_id, row["kind"], owner, row["attempts"])
    # heartbeats from the moment of the claim: the first import of the engine (MLX) below takes seconds, and a
    # lease left unrenewed that long is taken for a lost worker's
    with JobLease(job_id, owner, settings.lease_seconds) as lease:
        _execute(_info(job_id, row, owner), owner, lease, settings)
    _send_dependents(job_id)


def _ready(job_id: str) -> bool:
    """Whether the job may be claimed now: its dependencies succeeded. A blocked job is failed here."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist: message ignored", job_id)
            return False
        if job.status != lifecycle.QUEUED:
            return job.status in lifecycle.ACTIVE  # an expired lease is claimable; claim decides
        state = lifecycle.readiness(session, job)
        if state == "blocked":
            lifecycle.fail_blocked(session, job)
        elif state == "waiting":
            log.info("job %s waits for its dependencies; it is sent again when they finish", job_id)
    if state == "blocked":
        _send_dependents(job_id)
    return state == "ready"


def _info(job_id: str, row: dict[str, Any], owner: str) -> JobInfo:
    from worker.runs import JobInfo  # imports MLX: the first call in a process takes seconds

    return JobInfo(id=job_id, owner=owner, **row)


def _execute(info: JobInfo, owner: str, lease: JobLease, settings: Settings) -> None:
    from worker.recorder import JobRecorder

    recorder = JobRecorder(info.id, owner, on_lost=lease.lose)
    try:
        outcome = _run(info, owner, lease, settings, recorder)
    finally:
        recorder.flush()
    if outcome is None:
        return
    if outcome["status"] == lifecycle.FAILED and not lease.lost:
        removed = _discard_files(info, owner, settings)
        if removed and outcome.get("error_code") == RESOURCE:  # say how much the removal freed
            outcome["error_message"] += f" ({_free_space(job_output_dir(settings.artifact_root, info))} now)"
    if lease.lost:
        log.warning("job %s ended (%s) after its lease was lost: outcome not recorded", info.id, outcome["status"])
        return
    try:
        _record(info, owner, settings, **outcome)
    except Exception as e:  # e.g. an output file that cannot be registered: fail the job, don't retry it forever
        log.exception("job %s: could not record its outcome", info.id)
        _record(
            info,
            owner,
            settings,
            status=lifecycle.FAILED,
            error_code=INTERNAL_ERROR,
            error_message=f"could not record the outcome: {type(e).__name__}: {str(e)[:300]}",
        )


def _run(
    info: JobInfo, owner: str, lease: JobLease, settings: Settings, recorder: JobRecorder
) -> dict[str, Any] | None:
    """Run the job; its outcome as `finish` arguments, or None when there is nothing to record."""
    from worker import runs  # MLX is imported here, in the task, never at worker import time
    from worker.engine.errors import Cancelled, UserError

    try:
        result = runs.run(info, settings, recorder, lease.should_stop, lease.stop_now)
    except Cancelled:
        recorder.flush()
        _sync_checkpoints(info, owner, settings)
        if lease.lost:
            return None
        if lease.shutdown and not lease.cancel_requested:
            with session_scope() as session:
                lifecycle.release(
                    session, info.id, owner, "worker shutting down; queued again to resume from its last checkpoint"
                )
            return None
        return dict(status=lifecycle.CANCELLED, error_message="cancelled")
    except UserError as e:
        return dict(status=lifecycle.FAILED, error_code=e.code, error_message=str(e))
    except Exception as e:
        if not _disk_full(e):
            return _internal_error(info, e, recorder)
        where = getattr(e, "filename", None) or job_output_dir(settings.artifact_root, info)
        # the partial files are removed, and the free space measured after that, by _execute
        return dict(
            status=lifecycle.FAILED,
            error_code=RESOURCE,
            error_message=f"the disk is full: could not write {where} ({e}); the run's partial files "
            "were removed; free some space (e.g. delete finished jobs' files: DELETE /v1/jobs/{id}/files) "
            "and submit again",
        )
    return dict(status=lifecycle.SUCCEEDED, summary=result.summary, out_dir=result.out_dir)


def _disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or MLX's own wording when a save runs out of space."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("Unable to write", "No space left"))


def _discard_files(info: JobInfo, owner: str, settings: Settings) -> bool:
    """A failed run's files are of no further use (a failed job is not resumed): remove them, so a full disk
    does not stay full, and drop the checkpoint rows that named them. Fenced like every write of a run: a
    worker that lost the job removes nothing. Returns whether the files were removed."""
    from worker import attempts
    from worker.recorder import write_checkpoint_rows
    from worker.runs import work_dir

    if info.kind not in ("distill", "benchmark"):
        return False
    with session_scope() as session:
        if not lifecycle.fence(session, info.id, owner):
            return False
        attempts.discard(job_output_dir(settings.artifact_root, info), up_to=info.attempts)
        write_checkpoint_rows(session, info.id, work_dir(settings, info) / "checkpoints")
    return True


def _internal_error(info: JobInfo, e: Exception, recorder: JobRecorder) -> dict[str, Any]:
    tb = traceback.format_exc()
    log.error("job %s failed with an internal error:\n%s", info.id, tb)
    recorder.event("error", f"{type(e).__name__}: {e}", {"traceback": tb})
    return dict(status=lifecycle.FAILED, error_code=INTERNAL_ERROR, error_message=f"{type(e).__name__}: {str(e)[:500]}")


def _free_space(path: str | os.PathLike[str]) -> str:
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB is free in {folder}"
    return "free space unknown"


def _record(info: JobInfo, owner: str, settings: Settings, out_dir: Path | None = None, **outcome: Any) -> None:
    """The outcome, and a success's artifacts, in one transaction, by the lease owner only: the fence locks the
    job's row first, so the attempt's files are published only while its lease holds."""
    from worker import attempts
    from worker.recorder import write_checkpoint_rows

    with session_scope() as session:
        if not lifecycle.fence(session, info.id, owner):
            session.rollback()
            log.warning("job %s: its lease was lost before the end; outcome not recorded", info.id)
            return
        if out_dir is not None:
            job_dir = job_output_dir(settings.artifact_root, info)
            attempts.publish(out_dir, job_dir)
            if outcome.get("summary") is not None:  # paths the run reported now lie in the job's folder
                outcome["summary"] = attempts.moved_paths(outcome["summary"], out_dir, job_dir)
            register_output_dir(session, info, job_dir, settings.artifact_root, exclude=UNPUBLISHED)
            write_checkpoint_rows(session, info.id, job_dir / "checkpoints")
        if not lifecycle.finish(session, info.id, owner, **outcome):
            session.rollback()
            log.warning("job %s: its lease was lost before the end; outcome not recorded", info.id)
            return
    if out_dir is not None:
        attempts.discard(job_output_dir(settings.artifact_root, info))
    log.info(
        "job %s %s%s", info.id, outcome["status"], f": {outcome['error_message']}" if outcome.get("error_code") else ""
    )


def _sync_checkpoints(info: JobInfo, owner: str, settings: Settings) -> None:
    from worker.recorder import LeaseLost, sync_checkpoints
    from worker.runs import work_dir

    if info.kind == "distill":
        try:
            sync_checkpoints(info.id, work_dir(settings, info) / "checkpoints", owner)
        except LeaseLost:
            pass
        except Exception as e:
            log.warning("job %s: could not record its checkpoints: %s", info.id, e)


def _send_dependents(job_id: str) -> None:
    """Send the jobs that waited on this one and are ready now (those it blocked are failed on the way)."""
    try:
        with session_scope() as session:
            ready = lifecycle.dependents_ready(session, job_id)
        for dependent in ready:
            if queue.send(dependent):
                with session_scope() as session:
                    lifecycle.mark_enqueued(session, dependent)
    except Exception as e:  # the sweepers find them later
        log.warning("job %s: could not send its dependents now: %s", job_id, e)
