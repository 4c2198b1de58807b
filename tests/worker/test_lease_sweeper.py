"""JobLease (heartbeat thread, stop signals) and the Sweeper thread, against a real SQLite database."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from service.core import lifecycle
from service.core.db.models import Job, utcnow
from service.core.db.session import session_scope
from tests.worker.conftest import make_project, sqlite_url, wait_for
from worker import lease as lease_mod
from worker.lease import JobLease
from worker.sweeper import Sweeper, sweep_once


@pytest.fixture
def db(tmp_path, monkeypatch) -> str:
    from service.core.queue import celery_app
    from service.core.settings import get_settings

    url = sqlite_url(tmp_path)
    monkeypatch.setenv("DISTILLERY_DATABASE_URL", url)
    monkeypatch.setenv("DISTILLERY_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens: sends fail
    get_settings.cache_clear()
    celery_app.cache_clear()
    yield url
    get_settings.cache_clear()
    celery_app.cache_clear()


def running_job(db: str, owner: str = "w1", lease_seconds: int = 3) -> str:
    with session_scope(db) as s:
        job, _ = lifecycle.create_job(s, make_project(db), "teacher_cache", {"teacher": "m", "data": "d"})
        job_id = job.id
    with session_scope(db) as s:
        assert lifecycle.claim(s, job_id, owner, lease_seconds)
    return job_id


def expires(db: str, job_id: str):
    with session_scope(db) as s:
        return s.get(Job, job_id).lease_expires_at


def test_lease_renews_and_sees_cancellation_within_a_second(db):
    job_id = running_job(db, lease_seconds=3)
    first = expires(db, job_id)
    with JobLease(job_id, "w1", lease_seconds=3) as lease:
        wait_for(lambda: expires(db, job_id) > first, 3, "a renewal")
        assert not lease.should_stop()
        with session_scope(db) as s:
            lifecycle.request_cancel(s, s.get(Job, job_id))
        t0 = time.monotonic()
        wait_for(lambda: lease.cancel_requested, 3, "the cancel flag")
        assert time.monotonic() - t0 < 1.5 and lease.should_stop() and not lease.lost


def test_lease_lost_when_another_worker_took_the_job(db):
    job_id = running_job(db, lease_seconds=3)
    with JobLease(job_id, "w1", lease_seconds=3) as lease:
        with session_scope(db) as s:  # as if w1 had stalled past its lease: w2 claims the job
            s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        with session_scope(db) as s:
            assert lifecycle.claim(s, job_id, "w2", 60)
        wait_for(lambda: lease.lost, 3, "the lease to be lost")
        assert lease.should_stop() and not lease.cancel_requested
    with session_scope(db) as s:
        assert s.get(Job, job_id).lease_owner == "w2"


def test_shutdown_reaches_every_running_lease(db):
    a, b = running_job(db), running_job(db)
    with JobLease(a, "w1", 3) as la, JobLease(b, "w1", 3) as lb:
        lease_mod.shutdown_all()
        assert la.shutdown and lb.shutdown and la.should_stop() and lb.should_stop()
    assert not lease_mod._active


def test_sweep_once_leaves_jobs_unsent_while_the_broker_is_down(db):
    with session_scope(db) as s:
        job, _ = lifecycle.create_job(s, make_project(db), "teacher_cache", {"teacher": "m", "data": "d"})
        job_id = job.id
    assert sweep_once(600) == []
    with session_scope(db) as s:
        assert s.get(Job, job_id).enqueued_at is None  # still due: the next round tries again


def test_sweeper_survives_database_errors(monkeypatch, caplog):
    from service.core.settings import get_settings

    monkeypatch.setenv("DISTILLERY_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    get_settings.cache_clear()
    try:
        sweeper = Sweeper(interval_seconds=0.2, resend_after_seconds=600)
        with caplog.at_level(logging.WARNING, logger="worker.sweeper"):
            sweeper.start()
            wait_for(lambda: sum("sweep failed" in r.message for r in caplog.records) >= 2, 20, "two failed rounds")
        assert sweeper.is_alive()
        sweeper.stop()
        sweeper.join(5)
        assert not sweeper.is_alive()
    finally:
        get_settings.cache_clear()
