"""The database going away and coming back: every request that needs it is a 503 problem with Retry-After (the
API-key lookup included: not a 401, not a 500), the outage is logged once when it starts and once when the
database answers again (no traceback per request), and the API serves again as soon as it is back."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy import exc as sa

from service.core.db.availability import SETTLE_SECONDS, unavailable
from service.core.db.migrate import upgrade
from service.core.db.session import engine_for
from tests.helpers.private_postgres import private_postgres
from tests.service.conftest import closed_port, running_api

PROBLEM = "application/problem+json"
TOKEN = "operator-token"


def assert_503(r) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["status"] == 503 and body["type"].endswith("service-unavailable") and "database" in body["detail"]


@pytest.fixture
def service_log() -> Iterator[list[logging.LogRecord]]:
    """The records of the service's loggers (caplog's handler on the root logger is replaced when Litestar
    configures logging as an app starts)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def warnings_of(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def test_a_postgres_restart_is_503_then_served_again(tmp_path, service_log):
    with private_postgres() as server:
        upgrade(server.url)
        try:
            with running_api(server.url, tmp_path, metrics_token=TOKEN) as api:
                c = api.client
                operator = {"Authorization": f"Bearer {TOKEN}"}
                assert c.get("/v1/jobs", headers=api.headers).status_code == 200

                server.stop()
                service_log.clear()
                for path in ("/v1/jobs", "/v1/datasets", "/v1/models", "/v1/jobs", "/v1/jobs"):
                    assert_503(c.get(path, headers=api.headers))
                prefix = api.key.split("_")[1]  # a wrong key cannot be told from a right one: 503, not 401
                assert_503(c.get("/v1/jobs", headers={"Authorization": f"Bearer dst_{prefix}_wrong"}))
                assert c.get("/readyz").status_code == 503
                assert c.get("/metrics", headers=operator).status_code == 200  # without the jobs gauge
                warnings = warnings_of(service_log)
                assert len(warnings) == 1 and warnings[0].startswith("database unavailable"), warnings
                assert not any(r.exc_info for r in service_log), "no traceback for an outage"

                server.start()
                assert c.get("/v1/jobs", headers=api.headers).status_code == 200
                time.sleep(SETTLE_SECONDS)
                assert c.get("/v1/jobs", headers=api.headers).status_code == 200
                warnings = warnings_of(service_log)
                assert len(warnings) == 2 and "available again" in warnings[1], warnings
                assert "(8 requests refused" in warnings[1]  # 6 API calls, /readyz, the jobs gauge
                metrics = c.get("/metrics", headers=operator).text
                assert 'distillery_http_requests_total{method="GET",route="/v1/jobs",status="503"} 4.0' in metrics
                assert 'distillery_jobs{status="queued"} 0.0' in metrics
                assert not any(r.exc_info for r in service_log)
        finally:
            engine_for(server.url).dispose()


def _real_connection_error() -> sa.OperationalError:
    try:
        create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x").connect()
    except sa.OperationalError as e:
        return e
    raise AssertionError("a closed port accepted a connection")


def test_a_handler_that_loses_the_database_is_503(api, monkeypatch, service_log):
    """Past the key lookup, in the route handler itself."""
    import service.domain.datasets as datasets

    error = _real_connection_error()

    def lost(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(datasets, "list_datasets", lost)
    for _ in range(3):
        assert_503(api.client.get("/v1/datasets", headers=api.headers))
    assert len(warnings_of(service_log)) == 1 and not any(r.exc_info for r in service_log)
    monkeypatch.undo()
    assert api.client.get("/v1/datasets", headers=api.headers).status_code == 200
    time.sleep(SETTLE_SECONDS)
    assert api.client.get("/v1/datasets", headers=api.headers).status_code == 200
    warnings = warnings_of(service_log)
    assert len(warnings) == 2 and "available again" in warnings[1], warnings


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (sa.OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked")), True),
        (sa.OperationalError("SELECT 1", {}, sqlite3.OperationalError("no such table: api_keys")), False),
        (sa.InterfaceError("SELECT ?", {}, sqlite3.InterfaceError("Error binding parameter 1")), False),
        (sa.TimeoutError("QueuePool limit of size 10 overflow 20 reached"), True),
        (sa.IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")), False),
        (ValueError("not a database error"), False),
    ],
)
def test_which_errors_mean_unavailable(error, expected):
    assert unavailable(error) is expected


def test_a_real_connection_failure_means_unavailable():
    assert unavailable(_real_connection_error())
