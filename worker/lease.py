"""A running job's lease, kept alive from a background thread: the one place for heartbeats and stop signals.

The worker that claimed a job owns it while it renews the lease (`lifecycle.heartbeat`, every lease/3). The
thread also reads the job's cancel flag every second or so, so a cancellation is seen within about a second,
and gives the run two questions: `should_stop()` between steps, `stop_now()` at the engine's cancel points
within a phase (an evaluation, the learning-rate search). Three reasons to stop:

- `cancel_requested`: the user asked; the run checkpoints and the job ends `cancelled`;
- `lost`: the lease is gone (renewal refused, or impossible for longer than the lease): another worker may
  own the job now, so the run stops without recording any outcome;
- `shutdown`: this worker is shutting down; the run checkpoints and the job is released to be resumed elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select

from service.core import lifecycle
from service.core.db.models import Job
from service.core.db.session import session_scope

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 1.0
_active: set[JobLease] = set()
_active_lock = threading.Lock()


class JobLease:
    def __init__(self, job_id: str, owner: str, lease_seconds: int, poll_seconds: float = CANCEL_POLL_SECONDS):
        self.job_id, self.owner, self.lease_seconds = job_id, owner, lease_seconds
        self.renew_every = lease_seconds / 3
        self.poll_seconds = min(poll_seconds, self.renew_every)
        self.cancel_requested = False
        self.lost = False
        self.shutdown = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def should_stop(self) -> bool:
        """Whether to stop at the next step boundary (where the run checkpoints first)."""
        return self.cancel_requested or self.lost or self.shutdown

    def stop_now(self) -> bool:
        """Whether to stop at the next cancel point, mid-phase (worker.engine.cancel): the user cancelled, or
        the job is no longer ours. A shutdown waits for the step boundary, to checkpoint and hand the job back."""
        return self.cancel_requested or self.lost

    def __enter__(self) -> JobLease:
        with _active_lock:
            _active.add(self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with _active_lock:
            _active.discard(self)

    def _run(self) -> None:
        last_renewal = next_renewal = time.monotonic()
        next_renewal += self.renew_every
        while not self._stop.wait(self.poll_seconds):
            now = time.monotonic()
            try:
                with session_scope() as session:
                    if now >= next_renewal:
                        ours, cancel = lifecycle.heartbeat(session, self.job_id, self.owner, self.lease_seconds)
                        if not ours:
                            self._lose("the job's lease was taken over or the job ended elsewhere")
                        last_renewal, next_renewal = now, now + self.renew_every
                    else:
                        cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
            except Exception as e:  # the database is unreachable: keep trying until the lease runs out
                log.warning("lease of %s: renewal failed: %s", self.job_id, e)
                if time.monotonic() - last_renewal > self.lease_seconds:
                    self._lose(f"could not renew the lease for {self.lease_seconds}s")
                continue
            if cancel and not self.cancel_requested:
                log.info("job %s: cancellation requested", self.job_id)
                self.cancel_requested = True

    def lose(self, why: str) -> None:
        """Another part of the run found the lease gone (a fenced write was refused)."""
        self._lose(why)

    def _lose(self, why: str) -> None:
        if not self.lost:
            log.warning("job %s: lease lost (%s); stopping without recording an outcome", self.job_id, why)
        self.lost = True


def shutdown_all() -> None:
    """This process is shutting down: every running job checkpoints and is released at its next step."""
    with _active_lock:
        for lease in _active:
            lease.shutdown = True
