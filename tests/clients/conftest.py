"""A real `distillery-server api` process on SQLite over a socket, shared by the client tests, with Redis (db 12)
as the broker and no worker: jobs stay queued unless a test moves them by writing to the database, as a worker
would."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from distillery import Distillery
from service.core import lifecycle
from service.core.db.models import ApiKey, Artifact, Job, new_id
from tests.helpers.services import close_redis, free_port, redis_client, wait_for

SERVER = str(Path(sys.executable).parent / "distillery-server")
BROKER_URL = os.environ.get("DISTILLERY_TEST_CLIENT_REDIS", "redis://127.0.0.1:6379/12")


@dataclass
class Server:
    url: str
    key: str
    project_id: str
    artifact_root: Path
    sessions: sessionmaker[Session]
    tmp: Path

    @contextmanager
    def db(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session
            session.commit()

    def client(self, **kw) -> Distillery:
        return Distillery(self.url, self.key, **{"backoff": 0.01, **kw})

    # -- acting as a worker would
    def insert_job(self, status: str = "running", kind: str = "distill", total_steps: int | None = 100) -> str:
        with self.db() as session:
            job = Job(project_id=self.project_id, kind=kind, status=status, spec={}, total_steps=total_steps)
            session.add(job)
            session.flush()
            lifecycle.add_event(session, job.id, "created", f"{kind} job created")
            return job.id

    def add_events(self, job_id: str, n: int, kind: str = "progress") -> None:
        with self.db() as session:
            for i in range(n):
                lifecycle.add_event(session, job_id, kind, f"{kind} {i}", {"i": i})

    def set_progress(self, job_id: str, step: int, **summary) -> None:
        with self.db() as session:
            job = session.get(Job, job_id)
            job.progress_step, job.summary = step, summary

    def finish(self, job_id: str, status: str = "succeeded", **error) -> None:
        with self.db() as session:
            assert lifecycle.finish(session, job_id, None, status, **error)

    def insert_artifact(self, job_id: str, name: str, content: bytes) -> str:
        path = self.artifact_root / "jobs" / self.project_id / job_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        with self.db() as session:
            row = Artifact(
                id=new_id("art"),
                project_id=self.project_id,
                job_id=job_id,
                name=name,
                path=str(path),
                size_bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                content_type="application/octet-stream",
            )
            session.add(row)
            return row.id


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_root) -> Iterator[Server]:
    broker = redis_client(BROKER_URL)
    tmp = tmp_path_factory.mktemp("client-api")
    db_url = f"sqlite:///{tmp / 'api.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_DATABASE_URL=db_url,
        DISTILLERY_BROKER_URL=BROKER_URL,
        DISTILLERY_ARTIFACT_ROOT=str(tmp / "artifacts"),
        DISTILLERY_MODEL_ROOTS=json.dumps([str(tiny_root)]),
        DISTILLERY_EVENTS_POLL_SECONDS="0.05",
    )
    run = dict(env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert subprocess.run([SERVER, "migrate"], **run).returncode == 0
    created = subprocess.run([SERVER, "keys", "create", "--project", "sdk"], **run)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1].split()[-1]
    sessions = sessionmaker(create_engine(db_url), expire_on_commit=False)
    with sessions() as session:
        project_id = session.scalars(select(ApiKey.project_id)).one()
    port = free_port()
    log = open(tmp / "api.log", "w")
    proc = subprocess.Popen(
        [SERVER, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp / "api.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "the API", interval=0.1)
        yield Server(url, key, project_id, tmp / "artifacts", sessions, tmp)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        close_redis(broker)


@pytest.fixture
def client(server) -> Iterator[Distillery]:
    with server.client() as c:
        yield c


@pytest.fixture
def env(server, monkeypatch, tmp_path) -> Server:
    """The server's URL and key in DISTILLERY_*, and no config file."""
    monkeypatch.setenv("DISTILLERY_BASE_URL", server.url)
    monkeypatch.setenv("DISTILLERY_API_KEY", server.key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.delenv("DISTILLERY_CONFIG", raising=False)
    monkeypatch.delenv("DISTILLERY_PROFILE", raising=False)
    return server


@pytest.fixture
def cli(env, capsys):
    """The `distillery` CLI run in-process against the server: (exit code, stdout, stderr)."""
    from distillery.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
