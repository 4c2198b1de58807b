"""The Alembic migrations and the SQLAlchemy models describe the same schema, on SQLite and PostgreSQL, and
the migrations run down and up again cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.core.db.migrate import alembic_config, upgrade
from service.core.db.models import Base
from service.core.db.session import make_engine


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    yield request.getfixturevalue("fresh_pg_url")


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_models_match_migrations_and_downgrade_works(empty_database):
    url = empty_database
    upgrade(url)
    assert schema_diff(url) == []
    assert tables(url) == set(Base.metadata.tables)
    command.downgrade(alembic_config(url), "base")
    assert tables(url) == set()
    upgrade(url)
    assert schema_diff(url) == []
