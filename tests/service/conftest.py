"""API test fixtures: an app on a fresh SQLite file or on a PostgreSQL database made for this test session,
with Redis db 15 as the broker.

Every API test runs on both databases (`api` is parametrised). The session's PostgreSQL database (`pg_url`)
comes from tests/conftest.py, the PostgreSQL and Redis helpers from tests/helpers/services.py: when a server is
unreachable the tests that need it are skipped, unless DISTILLERY_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.core.db.migrate import upgrade
from service.core.db.session import engine_for
from service.core.settings import Settings
from service.http.app import create_app
from service.http.auth import create_api_key
from tests.helpers.services import PG_SERVER, close_redis, redis_client, truncate_all, unavailable  # noqa: F401
from tests.helpers.services import free_port as closed_port  # noqa: F401

BROKER_URL = os.environ.get("DISTILLERY_TEST_REDIS", "redis://127.0.0.1:6379/15")
QUEUE = "distillery"
MAX_UPLOAD = 64 * 1024


# ---------------------------------------------------------------------------------------- databases


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


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "distillery.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    truncate_all(url)
    return url


@pytest.fixture
def redis_broker():
    """Redis db 15, emptied; yields a client to inspect the queue."""
    client = redis_client(BROKER_URL)
    yield client
    close_redis(client)


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
    values = dict(
        database_url=database_url,
        broker_url=BROKER_URL,
        artifact_root=tmp / "artifacts",
        model_roots=[tmp / "models"],
        max_upload_bytes=MAX_UPLOAD,
        events_poll_seconds=0.02,
    )
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
        yield Api(
            client=client,
            settings=settings,
            sessions=sessions,
            key=key,
            project_id=row.project_id,
            tmp=tmp,
            redis=redis_client,
        )


@pytest.fixture
def api(database_url, tmp_path, redis_broker) -> Iterator[Api]:
    with running_api(database_url, tmp_path, redis_broker) as a:
        yield a
