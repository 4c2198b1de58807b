"""The sweeper: a thread in every worker process that keeps the queue honest (`lifecycle.sweep`).

Every `sweep_seconds` it turns jobs whose lease expired (their worker died) back into queued jobs, and sends
the queued jobs that are ready and were never sent (the broker was down when they were created, or they were
requeued or released) or were sent more than `enqueue_grace_seconds` ago and are still not taken (a message
lost with the broker). A broker that restarted empty is noticed at the next round (`queue.broker_restarted`)
and its queued jobs are sent again then, not after the grace. Any number of sweepers may run: each send is
taken by one of them (`lifecycle.take_for_sending`), claims are atomic, a duplicate message is ignored.
Database or broker errors are logged and the next round tries again.

After each good round the thread touches `ALIVE_FILE`: a container healthcheck reads its age to tell a live
worker that reaches its database from a stuck or cut-off one (the task itself may run for hours).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from service.core import lifecycle, queue
from service.core.db.session import session_scope

log = logging.getLogger(__name__)

ALIVE_FILE = Path(tempfile.gettempdir()) / "distillery-worker.alive"


def sweep_once(resend_after_seconds: int) -> list[str]:
    """One round; returns the ids it sent."""
    if queue.broker_restarted():
        with session_scope() as session:
            forgotten = lifecycle.forget_sends(session)
        if forgotten:
            log.warning("the broker lost its queue (it restarted empty): sending %d queued job(s) again", forgotten)
    with session_scope() as session:
        due = lifecycle.sweep(session, resend_after_seconds)
    sent = []
    for job_id in due:
        with session_scope() as session:
            mine = lifecycle.take_for_sending(session, job_id, resend_after_seconds)
        if not mine:
            continue  # another sweeper sends it
        if queue.send(job_id):
            sent.append(job_id)
        else:
            with session_scope() as session:
                lifecycle.unsend(session, job_id)
    if sent:
        log.info("sweeper sent %d job(s): %s", len(sent), ", ".join(sent))
    return sent


class Sweeper(threading.Thread):
    def __init__(self, interval_seconds: float, resend_after_seconds: int):
        super().__init__(name="distillery-sweeper", daemon=True)
        self.interval, self.resend_after = interval_seconds, resend_after_seconds
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep_once(self.resend_after)
                ALIVE_FILE.touch()
            except Exception as e:
                log.warning("sweep failed (retrying in %ss): %s", self.interval, e)
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        self._halt.set()
