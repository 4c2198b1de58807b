"""PostgreSQL sessions: one left idle inside a transaction (a frozen process) is ended by the server, so the
rows it locked can be taken by others; the default engine carries the setting."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import exc as sa
from sqlalchemy import text

from service.core.db.session import engine_for, make_engine
from service.core.settings import Settings


def test_a_transaction_left_idle_is_ended_and_its_locks_released(pg_url):
    frozen, other = make_engine(pg_url, idle_transaction_seconds=1), make_engine(pg_url)
    try:
        holder = frozen.connect()
        holder.begin()
        holder.execute(text("SELECT pg_advisory_xact_lock(4242)"))  # a lock held until the transaction ends
        with other.connect() as c:
            assert c.execute(text("SELECT pg_try_advisory_lock(4242)")).scalar() is False
        time.sleep(1.8)  # the holder idles in its transaction, as a stopped worker would
        with other.connect() as c:
            assert c.execute(text("SELECT pg_try_advisory_lock(4242)")).scalar() is True
            c.execute(text("SELECT pg_advisory_unlock(4242)"))
        with pytest.raises(sa.DBAPIError, match="idle-in-transaction"):  # the holder learns it when it wakes
            holder.execute(text("SELECT 1"))
        holder.close()
    finally:
        frozen.dispose()
        other.dispose()


def test_the_services_engine_sets_the_timeout(pg_url):
    assert Settings().db_idle_transaction_seconds == 300
    with engine_for(pg_url).connect() as c:
        assert c.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "5min"
