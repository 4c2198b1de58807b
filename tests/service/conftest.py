"""API test fixtures: an app on a fresh SQLite file or on a PostgreSQL database made for this test session,
with Redis db 15 as the broker.

Every API test runs on both databases (`api` is parametrised). PostgreSQL and Redis are real servers; when
one is unreachable the tests that need it are skipped, unless DISTILLERY_TEST_REQUIRE_SERVICES=1 (CI), which
makes that a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import create_api_key
from service.app import create_app
from service.db.migrate import upgrade
from service.db.models import Base
from service.db.session import engine_for
from service.settings import Settings

PG_SERVER = os.environ.get("DISTILLERY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
BROKER_URL = os.environ.get("DISTILLERY_TEST_REDIS", "redis://127.0.0.1:6379/15")
QUEUE = "distillery"
MAX_UPLOAD = 64 * 1024
REQUIRE = os.environ.get("DISTILLERY_TEST_REQUIRE_SERVICES") == "1"


def unavailable(what: str, error: Exception) -> None:
    if REQUIRE:
        pytest.fail(f"{what} unreachable: {error}")
    pytest.skip(f"{what} unreachable: {error}")


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"distillery_test_{secrets.token_hex(4)}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        admin.dispose()
        unavailable("PostgreSQL", e)
    url = f"{PG_SERVER}/{name}"
    upgrade(url)
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """One migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = engine_for(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


def _truncate_all(url: str) -> None:
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine_for(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "distillery.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    _truncate_all(url)
    return url


@pytest.fixture
def redis_broker():
    """Redis db 15, emptied; yields a client to inspect the queue."""
    import redis

    client = redis.Redis.from_url(BROKER_URL)
    try:
        client.flushdb()
    except Exception as e:
        unavailable("Redis", e)
    yield client
    client.flushdb()
    client.close()


# ---------------------------------------------------------------------------------------------- app


@dataclass
class Api:
    """An app under test, its client, and a key of project `main`."""

    client: TestClient
    settings: Settings
    sessions: sessionmaker[Session]
    key: str
    project_id: str
    tmp: Path
    redis: object | None = None
    _keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @contextmanager
    def db(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session
            session.commit()

    def other_project(self, name: str = "other") -> tuple[dict[str, str], str]:
        """(headers, project id) of a key for another project."""
        if name not in self._keys:
            with self.db() as session:
                row, key = create_api_key(session, name)
                self._keys[name] = (key, row.project_id)
        key, project_id = self._keys[name]
        return {"Authorization": f"Bearer {key}"}, project_id

    def queue_length(self) -> int:
        return int(self.redis.llen(QUEUE))


def make_settings(database_url: str, tmp: Path, **overrides) -> Settings:
    (tmp / "models").mkdir(exist_ok=True)
    values = dict(database_url=database_url, broker_url=BROKER_URL, artifact_root=tmp / "artifacts",
                  model_roots=[tmp / "models"], max_upload_bytes=MAX_UPLOAD, events_poll_seconds=0.02)
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_api(database_url: str, tmp: Path, redis_client=None, **overrides) -> Iterator[Api]:
    settings = make_settings(database_url, tmp, **overrides)
    app = create_app(settings)
    sessions = app.state.sessions
    with sessions() as session:
        row, key = create_api_key(session, "main")
        session.commit()
    with TestClient(app) as client:
        yield Api(client=client, settings=settings, sessions=sessions, key=key, project_id=row.project_id,
                  tmp=tmp, redis=redis_client)


@pytest.fixture
def api(database_url, tmp_path, redis_broker) -> Iterator[Api]:
    with running_api(database_url, tmp_path, redis_broker) as a:
        yield a
