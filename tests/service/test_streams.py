"""Event streams under load, against a real `distillery-server api` process on PostgreSQL.

Regression: 80 concurrent streams of a queued job took every pooled connection ("idle in transaction") and
blocked the event loop for good. Now 500 streams are served by one poller, hold no connection or transaction
while they wait, each key is bounded, and the API keeps answering during and after the burst."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import pytest
from sqlalchemy import text

from service.core import lifecycle
from service.core.db.models import Job
from service.core.db.session import make_engine, session_scope
from service.http.auth import create_api_key
from tests.helpers.api_process import api_process, healthy
from tests.helpers.services import truncate_all
from tests.service.conftest import BROKER_URL

KEYS = 8
PER_KEY = 63  # 8 x 63 = 504 streams, each key just under its bound


@pytest.fixture
def pg_server(tmp_path, pg_url, redis_broker):
    truncate_all(pg_url)
    with session_scope(pg_url) as session:
        keys = [create_api_key(session, f"p{i}")[1] for i in range(KEYS)]
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": pg_url,
        "DISTILLERY_BROKER_URL": BROKER_URL,
        "DISTILLERY_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "DISTILLERY_EVENTS_POLL_SECONDS": "0.2",
        "DISTILLERY_STREAMS_PER_KEY": str(PER_KEY),
    }
    with api_process(env, tmp_path) as (base, _):
        yield base, keys, pg_url


def _queued_job(url: str, project_name: str) -> str:
    """A queued job of the project (no worker runs, so it stays queued and its streams stay open)."""
    from sqlalchemy import select

    from service.core.db.models import Project

    with session_scope(url) as session:
        project = session.scalars(select(Project).where(Project.name == project_name)).one()
        job = Job(project_id=project.id, kind="teacher_cache", status="queued", spec={}, total_steps=10)
        session.add(job)
        session.flush()
        return job.id


def test_500_streams_hold_no_connection_and_the_api_keeps_answering(pg_server):
    base, keys, url = pg_server
    jobs = [_queued_job(url, f"p{i}") for i in range(KEYS)]
    engine = make_engine(url)

    async def main() -> None:
        received: dict[int, list[str]] = {}
        opened = asyncio.Event()
        status: dict[int, int] = {}

        async def stream(client: httpx.AsyncClient, n: int) -> None:
            key, job = keys[n % KEYS], jobs[n % KEYS]
            async with client.stream(
                "GET", f"/v1/jobs/{job}/events/stream", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                status[n] = r.status_code
                if len(status) == KEYS * PER_KEY:
                    opened.set()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        received.setdefault(n, []).append(line)

        limits = httpx.Limits(max_connections=KEYS * PER_KEY + 10)
        timeout = httpx.Timeout(30, read=None)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:
            tasks = [asyncio.create_task(stream(client, n)) for n in range(KEYS * PER_KEY)]
            await asyncio.wait_for(opened.wait(), timeout=120)
            assert set(status.values()) == {200}

            # the API answers, with and without the database, while every stream is open
            started = time.monotonic()
            assert (await client.get("/healthz", timeout=5)).status_code == 200
            job = await client.get(f"/v1/jobs/{jobs[0]}", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=5)
            assert job.status_code == 200 and job.json()["status"] == "queued"
            assert time.monotonic() - started < 10

            # no stream holds a connection or an open transaction while it waits
            with engine.connect() as conn:
                idle_in_tx = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
                connections = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            assert idle_in_tx == 0
            assert connections <= 30  # the pool's bound, not one per stream

            # one more stream on a key at its bound: 429 with Retry-After, as problem+json
            more = await client.get(
                f"/v1/jobs/{jobs[0]}/events/stream", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=5
            )
            assert more.status_code == 429 and more.headers["retry-after"].isdigit()
            assert more.headers["content-type"].startswith("application/problem+json")
            assert "open event streams" in more.json()["detail"]

            # a new event reaches every stream of its job, a state change every stream
            with session_scope(url) as session:
                lifecycle.add_event(session, jobs[1], "log", "hello streams")
            deadline = time.monotonic() + 30
            mine = [n for n in range(KEYS * PER_KEY) if n % KEYS == 1]
            while time.monotonic() < deadline and not all(
                any("hello streams" in line for line in received.get(n, [])) for n in mine
            ):
                await asyncio.sleep(0.2)
            assert all(any("hello streams" in line for line in received.get(n, [])) for n in mine)
            assert not any(
                "hello streams" in line for n in range(KEYS * PER_KEY) if n % KEYS != 1 for line in received.get(n, [])
            )

            # the clients vanish abruptly
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        # the API still answers, and the bound is released: the key may open streams again
        assert healthy(base, 3)
        deadline = time.monotonic() + 20
        while True:
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                async with client.stream(
                    "GET", f"/v1/jobs/{jobs[0]}/events/stream", headers={"Authorization": f"Bearer {keys[0]}"}
                ) as r:
                    if r.status_code == 200:
                        break
            assert time.monotonic() < deadline, "the streams' slots were not released"
            await asyncio.sleep(0.5)

    try:
        asyncio.run(main())
    finally:
        engine.dispose()


def test_a_finished_job_ends_every_stream(pg_server):
    base, keys, url = pg_server
    job = _queued_job(url, "p0")
    headers = {"Authorization": f"Bearer {keys[0]}"}

    async def main() -> list[list[str]]:
        async def stream(client: httpx.AsyncClient) -> list[str]:
            async with client.stream("GET", f"/v1/jobs/{job}/events/stream", headers=headers) as r:
                return [line async for line in r.aiter_lines() if line.startswith(("event:", "data:"))]

        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30, read=60)) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(20)]
            await asyncio.sleep(1.5)
            with session_scope(url) as session:
                row = session.get(Job, job)
                row.status = "cancelled"
                lifecycle.add_event(session, job, "cancelled", "cancelled by the test")
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    for lines in asyncio.run(main()):
        assert "event: cancelled" in lines
        states = [
            json.loads(line[5:])
            for line in lines
            if line.startswith("data:") and '"status"' in line and '"progress"' in line
        ]
        assert states[-1]["status"] == "cancelled"
