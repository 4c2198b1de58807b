"""The job lifecycle in the database (service.core.lifecycle), on SQLite and on PostgreSQL: claims, leases,
heartbeats, the sweep, cancellation, releases and dependencies."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from service.core import lifecycle
from service.core.db.models import Base, Job, JobEvent, utcnow
from service.core.db.session import engine_for, session_scope
from tests.worker.conftest import make_project, sqlite_url

DISTILL = {
    "student": {"model": "mdl_s"},
    "teachers": [{"model": "mdl_t"}],
    "teacher_mode": "offline",
    "data": {"train": "ds_train", "valid": "ds_valid"},
    "loss": {"top_k": 16},
    "training": {"max_seq_len": 48},
}


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    url = request.getfixturevalue("pg_url")
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine_for(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return url


@pytest.fixture
def project(db) -> str:
    return make_project(db)


def new_job(db, project, kind="teacher_cache", spec=None) -> str:
    with session_scope(db) as s:
        job, _ = lifecycle.create_job(s, project, kind, spec or {"teacher": "mdl_t", "data": "ds_d"})
        return job.id


def get(db, job_id) -> Job:
    with session_scope(db) as s:
        return s.get(Job, job_id)


def event_kinds(db, job_id) -> list[str]:
    with session_scope(db) as s:
        return list(s.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def claim(db, job_id, owner="w1", lease=60):
    with session_scope(db) as s:
        job = lifecycle.claim(s, job_id, owner, lease)
        return job.id if job else None


def expire_lease(db, job_id) -> None:
    with session_scope(db) as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_claim_is_exclusive_under_a_race(db, project):
    jobs = [new_job(db, project) for _ in range(8)]
    racers = 4
    results: dict[str, list] = {j: [] for j in jobs}

    def race(owner: str, barrier: threading.Barrier) -> None:
        for job_id in jobs:
            barrier.wait()
            results[job_id].append(claim(db, job_id, owner))

    barrier = threading.Barrier(racers)
    threads = [threading.Thread(target=race, args=(f"w{i}", barrier)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job_id, got in results.items():
        assert len(got) == racers and sum(r is not None for r in got) == 1, got
        row = get(db, job_id)
        assert row.status == "running" and row.attempts == 1 and row.lease_owner.startswith("w")
        assert event_kinds(db, job_id) == ["created", "started"]


def test_claim_takes_an_expired_lease_but_not_a_live_one(db, project):
    job_id = new_job(db, project)
    assert claim(db, job_id, "w1", lease=60)
    assert claim(db, job_id, "w2") is None
    expire_lease(db, job_id)
    assert claim(db, job_id, "w2")
    row = get(db, job_id)
    assert (row.lease_owner, row.attempts) == ("w2", 2)
    assert event_kinds(db, job_id)[-1] == "resumed"
    with session_scope(db) as s:
        assert not lifecycle.finish(s, job_id, "w1", lifecycle.SUCCEEDED)  # the old owner records nothing
        assert lifecycle.finish(s, job_id, "w2", lifecycle.SUCCEEDED, summary={"ok": 1})
        assert not lifecycle.finish(s, job_id, "w2", lifecycle.FAILED)  # an outcome is written once
    row = get(db, job_id)
    assert (row.status, row.summary, row.lease_owner) == ("succeeded", {"ok": 1}, None)
    assert claim(db, job_id, "w3") is None


def test_heartbeat_renews_and_reports_cancellation(db, project):
    job_id = new_job(db, project)
    claim(db, job_id, "w1", lease=5)
    before = get(db, job_id).lease_expires_at
    with session_scope(db) as s:
        assert lifecycle.heartbeat(s, job_id, "w1", 600) == (True, False)
        assert lifecycle.heartbeat(s, job_id, "intruder", 600) == (False, False)
    assert get(db, job_id).lease_expires_at > before + timedelta(seconds=500)
    with session_scope(db) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
    assert get(db, job_id).status == "cancel_requested"
    with session_scope(db) as s:
        assert lifecycle.heartbeat(s, job_id, "w1", 600) == (True, True)  # still ours until it stops
        assert lifecycle.finish(s, job_id, "w1", lifecycle.CANCELLED, error_message="cancelled")
    with session_scope(db) as s:
        assert lifecycle.heartbeat(s, job_id, "w1", 600) == (False, True)
    assert event_kinds(db, job_id)[-2:] == ["cancel_requested", "cancelled"]


def test_cancel_paths(db, project):
    queued = new_job(db, project)
    with session_scope(db) as s:
        lifecycle.request_cancel(s, s.get(Job, queued))
    assert get(db, queued).status == "cancelled" and claim(db, queued) is None

    flagged = new_job(db, project)  # flagged, but its worker had not seen it yet: claim cancels it
    with session_scope(db) as s:
        s.execute(update(Job).where(Job.id == flagged).values(cancel_requested=True))
    assert claim(db, flagged) is None and get(db, flagged).status == "cancelled"

    orphan = new_job(db, project)  # cancel requested, then its worker died: the sweep cancels it
    claim(db, orphan, "w1")
    with session_scope(db) as s:
        lifecycle.request_cancel(s, s.get(Job, orphan))
    expire_lease(db, orphan)
    with session_scope(db) as s:
        assert orphan not in lifecycle.sweep(s, 600)
    assert get(db, orphan).status == "cancelled"

    done = new_job(db, project)
    claim(db, done, "w1")
    with session_scope(db) as s:
        lifecycle.finish(s, done, "w1", lifecycle.SUCCEEDED)
        lifecycle.request_cancel(s, s.get(Job, done))
    assert get(db, done).status == "succeeded"


def test_release_requeues_unless_cancelled(db, project):
    job_id = new_job(db, project)
    claim(db, job_id, "w1")
    with session_scope(db) as s:
        lifecycle.mark_enqueued(s, job_id)
        assert not lifecycle.release(s, job_id, "w2", "not mine")
        assert lifecycle.release(s, job_id, "w1", "shutting down")
    row = get(db, job_id)
    assert (row.status, row.lease_owner, row.enqueued_at) == ("queued", None, None)
    with session_scope(db) as s:
        assert job_id in lifecycle.sweep(s, 600)  # sent again at once
    claim(db, job_id, "w2")
    with session_scope(db) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
        lifecycle.release(s, job_id, "w2", "shutting down")
    assert get(db, job_id).status == "cancelled"


def test_sweep_requeues_lost_jobs_and_resends_unsent_ones(db, project):
    lost, live, unsent, sent_recently, sent_long_ago = (new_job(db, project) for _ in range(5))
    claim(db, lost, "w1")
    claim(db, live, "w2")
    expire_lease(db, lost)
    with session_scope(db) as s:
        lifecycle.mark_enqueued(s, sent_recently)
        lifecycle.mark_enqueued(s, sent_long_ago)
        s.execute(update(Job).where(Job.id == sent_long_ago).values(enqueued_at=utcnow() - timedelta(hours=1)))
    with session_scope(db) as s:
        due = lifecycle.sweep(s, resend_after_seconds=600)
    assert set(due) == {lost, unsent, sent_long_ago}
    row = get(db, lost)
    assert (row.status, row.lease_owner, row.lease_expires_at, row.enqueued_at) == ("queued", None, None, None)
    assert event_kinds(db, lost)[-1] == "requeued"
    assert get(db, live).status == "running"
    # idempotent: a second sweep (another worker's) changes nothing and adds no event
    with session_scope(db) as s:
        assert set(lifecycle.sweep(s, 600)) == {lost, unsent, sent_long_ago}
    assert event_kinds(db, lost).count("requeued") == 1
    assert claim(db, lost, "w3") and get(db, lost).attempts == 2


def test_dependencies_ready_waiting_blocked(db, project):
    with session_scope(db) as s:
        job, caches = lifecycle.create_job(s, project, "distill", DISTILL, total_steps=10)
        distill, cache_ids = job.id, [c.id for c in caches]
        assert lifecycle.readiness(s, job) == "waiting"
        again, reused = lifecycle.create_job(s, project, "distill", DISTILL)  # same inputs: same cache jobs
        assert reused == [] and {d.id for d in lifecycle.dependencies(s, again.id)} == set(cache_ids)
        second = again.id
    assert len(cache_ids) == 2 and get(db, distill).total_steps == 10
    with session_scope(db) as s:
        assert set(lifecycle.sweep(s, 600)) == set(cache_ids)  # waiting jobs are not sent

    first, other = cache_ids
    claim(db, first, "w1")
    with session_scope(db) as s:
        lifecycle.finish(s, first, "w1", lifecycle.SUCCEEDED)
    with session_scope(db) as s:
        assert lifecycle.dependents_ready(s, first) == []  # the other cache still runs
    claim(db, other, "w1")
    with session_scope(db) as s:
        lifecycle.finish(s, other, "w1", lifecycle.SUCCEEDED)
    with session_scope(db) as s:
        assert set(lifecycle.dependents_ready(s, other)) == {distill, second}

    # a failed dependency fails its dependents, with the cause and the dependency's error code
    with session_scope(db) as s:
        spec = {**DISTILL, "data": {"train": "ds_bad", "valid": 0.1}}
        blocked, (bad_cache,) = lifecycle.create_job(s, project, "distill", spec)
        blocked = blocked.id
        bad_cache = bad_cache.id
    claim(db, bad_cache, "w1")
    with session_scope(db) as s:
        lifecycle.finish(s, bad_cache, "w1", lifecycle.FAILED, error_code="user_error", error_message="bad line 3")
    with session_scope(db) as s:
        assert lifecycle.dependents_ready(s, bad_cache) == []
    row = get(db, blocked)
    assert (row.status, row.error_code) == ("failed", "user_error")
    assert bad_cache in row.error_message and "bad line 3" in row.error_message


def test_fence_admits_only_the_lease_owner_of_a_live_job(db, project):
    job_id = new_job(db, project)
    assert claim(db, job_id, "w1")
    with session_scope(db) as s:
        assert lifecycle.fence(s, job_id, "w1") and not lifecycle.fence(s, job_id, "w2")
    expire_lease(db, job_id)
    with session_scope(db) as s:  # expired but not taken: still the owner's to write
        assert lifecycle.fence(s, job_id, "w1")
    assert claim(db, job_id, "w2")
    with session_scope(db) as s:
        assert not lifecycle.fence(s, job_id, "w1") and lifecycle.fence(s, job_id, "w2")
        lifecycle.finish(s, job_id, "w2", lifecycle.SUCCEEDED)
    with session_scope(db) as s:
        assert not lifecycle.fence(s, job_id, "w2")  # an ended job takes no more writes
