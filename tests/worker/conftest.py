"""Worker test fixtures: real databases (a SQLite file, a PostgreSQL database made for the session), Redis db 14
as the broker, and real `distillery-server worker` processes.

The session's PostgreSQL database (`pg_url`) comes from tests/conftest.py, the PostgreSQL and Redis helpers from
tests/helpers/services.py: when a server is unreachable the tests that need it are skipped, unless
DISTILLERY_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.core import lifecycle
from service.core.db.migrate import upgrade
from service.core.db.models import Dataset, Model, Project, new_id
from service.core.db.session import session_scope
from tests.helpers.services import (  # noqa: F401  (re-exported for the worker tests)
    PG_SERVER,
    REQUIRE,
    ROOT,
    close_redis,
    drop_pg_database,
    redis_client,
    unavailable,
    wait_for,
)
from tests.helpers.services import create_pg_database as _create_pg_database

BROKER_URL = os.environ.get("DISTILLERY_TEST_WORKER_REDIS", "redis://127.0.0.1:6379/14")


def create_pg_database() -> str:
    """A new, migrated PostgreSQL database."""
    return _create_pg_database("distillery_wtest")


def sqlite_url(folder: Path) -> str:
    url = f"sqlite:///{folder / 'distillery.db'}"
    upgrade(url)
    return url


def make_project(url: str, name: str | None = None) -> str:
    with session_scope(url) as s:
        project = Project(name=name or f"p-{secrets.token_hex(4)}")
        s.add(project)
        s.flush()
        return project.id


# ---------------------------------------------------------------------------------------- a service


class Service:
    """One database + artifact root + broker, as the API would leave them, and the worker processes on it."""

    def __init__(self, folder: Path, database_url: str, broker_url: str):
        self.folder, self.database_url, self.broker_url = folder, database_url, broker_url
        self.artifact_root = folder / "artifacts"
        self.cache_dir = folder / "cache"
        self.env = {
            **os.environ,
            "DISTILLERY_DATABASE_URL": database_url,
            "DISTILLERY_BROKER_URL": broker_url,
            "DISTILLERY_ARTIFACT_ROOT": str(self.artifact_root),
            "DISTILLERY_CACHE_DIR": str(self.cache_dir),
            "DISTILLERY_LEASE_SECONDS": "3",
            "DISTILLERY_SWEEP_SECONDS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: list[subprocess.Popen] = []
        self.project_id = make_project(database_url)

    # -- rows the API would have written
    def add_model(self, path: Path, name: str = "m") -> str:
        with session_scope(self.database_url) as s:
            row = Model(
                project_id=self.project_id,
                name=name,
                source="path",
                format="mlx",
                path=str(path),
                fingerprint="0" * 64,
                info={},
            )
            s.add(row)
            s.flush()
            return row.id

    def add_dataset(self, src: Path, name: str = "d", fmt: str = "text") -> str:
        dataset_id = new_id("ds")
        dest = self.artifact_root / "datasets" / self.project_id / f"{dataset_id}.jsonl"  # where the API keeps it
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        with session_scope(self.database_url) as s:
            row = Dataset(
                id=dataset_id,
                project_id=self.project_id,
                name=name,
                format=fmt,
                path=str(dest),
                sha256="0" * 64,
                size_bytes=dest.stat().st_size,
                records=sum(1 for _ in dest.open()),
            )
            s.add(row)
            s.flush()
            return row.id

    def submit(self, kind: str, spec: dict, send: Callable[[str], bool] | None = None) -> str:
        """As the API does: insert the job (and its cache jobs), commit, then send what is ready."""
        from service.core import queue

        send = send or queue.send
        with session_scope(self.database_url) as s:
            job, caches = lifecycle.create_job(
                s, self.project_id, kind, spec, total_steps=spec.get("training", {}).get("steps")
            )
            ready = [c.id for c in caches] + ([job.id] if lifecycle.readiness(s, job) == "ready" else [])
            job_id = job.id
        for jid in ready:
            if send(jid):
                with session_scope(self.database_url) as s:
                    lifecycle.mark_enqueued(s, jid)
        return job_id

    # -- worker processes
    def start_worker(self) -> subprocess.Popen:
        n = len(self.workers)
        log = open(self.folder / f"worker-{n}.log", "w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.commands.cli",
                "worker",
                "--loglevel",
                "info",
                "--hostname",
                f"w{n}-{os.getpid()}@%h",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def live_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers if p.poll() is None]

    def ensure_workers(self, n: int, timeout: float = 90) -> None:
        """At least `n` live workers, each past its start-up (consuming, its sweeper running): a takeover test
        that freezes or stops one must not time the other's start-up instead."""
        while len(self.live_workers()) < n:
            self.start_worker()
        logs = {p.pid: self.folder / f"worker-{i}.log" for i, p in enumerate(self.workers)}
        for p in self.live_workers():
            wait_for(lambda p=p: " ready." in logs[p.pid].read_text(), timeout, f"worker {p.pid} to be ready")

    def ensure_worker(self) -> None:
        if not self.live_workers():
            self.start_worker()

    def stop_workers(self) -> None:
        for p in self.live_workers():
            p.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.folder.glob("worker-*.log")))


@pytest.fixture(scope="module")
def redis_db14():
    client = redis_client(BROKER_URL)
    yield client
    close_redis(client)


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_db14) -> Iterator[Service]:
    """A SQLite service (set DISTILLERY_TEST_WORKER_DB=postgres for PostgreSQL) with one worker running."""
    from service.core.queue import celery_app
    from service.core.settings import get_settings

    folder = tmp_path_factory.mktemp("svc")
    on_pg = os.environ.get("DISTILLERY_TEST_WORKER_DB", "sqlite") == "postgres"
    url = create_pg_database() if on_pg else sqlite_url(folder)
    svc = Service(folder, url, BROKER_URL)
    saved = {k: os.environ.get(k) for k in svc.env if k.startswith("DISTILLERY_")}
    os.environ.update({k: v for k, v in svc.env.items() if k.startswith("DISTILLERY_")})
    get_settings.cache_clear()
    celery_app.cache_clear()
    svc.start_worker()
    try:
        yield svc
    finally:
        svc.stop_workers()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()
        celery_app.cache_clear()
        if on_pg:
            drop_pg_database(url)
