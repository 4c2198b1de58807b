"""A broker that restarts empty with jobs queued, for real: a private Redis server, killed and started again.

Before, idle workers waited out the whole enqueue grace (10 minutes) and then every sweeper re-sent every job
(192 messages for 96 jobs). Now the first sweep after the restart notices the lost queue and the queued jobs
are sent again at once, each exactly once, however many sweepers run."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers.services import free_port, wait_for
from tests.worker.conftest import Service, sqlite_url
from tests.worker.test_worker_process import distill_spec, job, wait_done

JOBS = 4


class PrivateRedis:
    """A redis-server of the test's own, without persistence: a restart empties it, as a crashed one would."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, "the private redis-server to answer")

    def _answers(self) -> bool:
        try:
            return redis.Redis.from_url(self.url, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def queue_length(self) -> int:
        return int(redis.Redis.from_url(self.url).llen("distillery"))


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_jobs_queued_when_the_broker_restarts_empty_are_sent_again_at_once_and_once(
    tmp_path, private_redis, tiny_teacher, tiny_student, tiny_text
):
    from service.core.queue import make_celery, send

    svc = Service(tmp_path, sqlite_url(tmp_path), private_redis.url)
    svc.env["DISTILLERY_ENQUEUE_GRACE_SECONDS"] = "600"  # the default: waiting it out would take 10 minutes
    refs = (
        svc.add_model(tiny_student, "s"),
        svc.add_model(tiny_teacher, "t"),
        svc.add_dataset(tiny_text["train"], "train"),
        svc.add_dataset(tiny_text["valid"], "valid"),
    )
    celery = make_celery(private_redis.url)
    spec = distill_spec(*refs, steps=2)
    spec["teacher_mode"] = "online"
    ids = [svc.submit("distill", spec, send=lambda jid: send(jid, celery)) for _ in range(JOBS)]
    assert private_redis.queue_length() == JOBS and all(job(svc, j).enqueued_at for j in ids)

    private_redis.stop()  # the broker dies with the messages, and comes back empty
    private_redis.start()
    assert private_redis.queue_length() == 0

    t0 = time.monotonic()
    svc.start_worker()
    svc.start_worker()  # two sweepers race for the same jobs
    try:
        done = [wait_done(svc, j, timeout=120) for j in ids]
    finally:
        svc.stop_workers()
    assert [d.status for d in done] == ["succeeded"] * JOBS, svc.logs()
    assert time.monotonic() - t0 < 120  # a sweep interval or so, then the runs: not the 600 s grace
    logs = "".join(p.read_text() for p in tmp_path.glob("worker-*.log"))
    sent = sum(int(n) for n in re.findall(r"sweeper sent (\d+) job", logs))
    assert sent == JOBS, logs[-6000:]  # each lost message sent again once, not once per sweeper
    assert logs.count("the broker lost its queue") == 1
    assert all(d.attempts == 1 for d in done)
