"""The database restarts mid-run, for real: a PostgreSQL server of the test's own, stopped and started while a
real worker trains. The outage outlasts the lease, so the run stops without recording anything and the job is
resumed from its last checkpoint once the database is back: it succeeds, with every step recorded once."""

from __future__ import annotations

import time

from service.core.db.migrate import upgrade
from tests.helpers.private_postgres import private_postgres
from tests.worker.conftest import BROKER_URL, Service, wait_for
from tests.worker.test_worker_process import checkpoint_steps, distill_spec, job, loss_steps, wait_done


def test_a_run_survives_a_database_restart(tmp_path, redis_db14, tiny_teacher, tiny_student, tiny_text):
    with private_postgres() as server:
        upgrade(server.url)
        svc = Service(tmp_path, server.url, BROKER_URL)
        refs = (
            svc.add_model(tiny_student, "s"),
            svc.add_model(tiny_teacher, "t"),
            svc.add_dataset(tiny_text["train"], "train"),
            svc.add_dataset(tiny_text["valid"], "valid"),
        )
        spec = distill_spec(*refs, steps=120, checkpoint_every=10, eval_every=60)
        spec["teacher_mode"] = "online"
        svc.start_worker()
        try:
            job_id = svc.submit("distill", spec)
            wait_for(lambda: checkpoint_steps(svc, job_id), 90, "a first checkpoint")
            server.stop()
            time.sleep(5)  # past the 3 s lease: the worker must give the run up
            server.start()
            done = wait_done(svc, job_id, timeout=180)
        finally:
            svc.stop_workers()
        assert done.status == "succeeded", (done.error_code, done.error_message, svc.logs())
        assert loss_steps(svc, job_id) == list(range(1, 121))  # none lost, none twice
        assert done.attempts >= 2 and job(svc, job_id).lease_owner is None
