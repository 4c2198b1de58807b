"""Real PostgreSQL and Redis for the tests: make and drop databases, empty Redis dbs, wait, find free ports.

PostgreSQL and Redis are real servers; when one is unreachable the tests that need it are skipped, unless
DISTILLERY_TEST_REQUIRE_SERVICES=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_SERVER = os.environ.get("DISTILLERY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("DISTILLERY_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
REQUIRE = os.environ.get("DISTILLERY_TEST_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parents[2]


def unavailable(what: str, error: Exception) -> None:
    if REQUIRE:
        pytest.fail(f"{what} unreachable: {error}")
    pytest.skip(f"{what} unreachable: {error}")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_pg_database(prefix: str = "distillery_test", migrate: bool = True) -> str:
    """A new PostgreSQL database (migrated unless told otherwise); its URL. Skips (or fails, in CI) when the
    server is unreachable."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        unavailable("PostgreSQL", e)
    finally:
        admin.dispose()
    url = f"{PG_SERVER}/{name}"
    if migrate:
        from service.core.db.migrate import upgrade

        upgrade(url)
    return url


def drop_pg_database(url: str) -> None:
    from service.core.db.session import engine_for

    engine_for(url).dispose()
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    finally:
        admin.dispose()


def redis_client(url: str):
    """A client of the Redis db at `url`, emptied; skips (or fails, in CI) when Redis is unreachable."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except Exception as e:
        client.close()
        unavailable("Redis", e)
    return client


def close_redis(client) -> None:
    try:
        client.flushdb()
    finally:
        client.close()


def truncate_all(url: str) -> None:
    """Empty every table of the database at `url`."""
    from service.core.db.models import Base
    from service.core.db.session import engine_for

    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine_for(url).begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
