"""`/healthz` (the process answers), `/readyz` (database and broker reachable), `/metrics` (Prometheus: the
operator view with the metrics token, the process metrics alone without; see service.http.metrics)."""

from __future__ import annotations

import logging

import anyio.to_thread
from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.core import queue
from service.core.db.availability import unavailable
from service.http.auth import is_operator
from service.http.problems import Problem
from service.http.schemas import ReadyOut

log = logging.getLogger(__name__)


class OpsController(Controller):
    tags = ["operations"]
    include_in_schema = True

    @get("/healthz", summary="Liveness: the process answers", sync_to_thread=False)
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz", summary="Readiness: database and broker reachable")
    async def readyz(self, state: State) -> ReadyOut:
        database = await anyio.to_thread.run_sync(_database_ok, state)
        broker = await anyio.to_thread.run_sync(queue.broker_ok, state.celery)
        checks = {"database": "ok" if database else "unreachable", "broker": "ok" if broker else "unreachable"}
        failing = [name for name, value in checks.items() if value != "ok"]
        if failing:
            raise Problem(
                503,
                f"not ready: {' and '.join(failing)} unreachable",
                errors=[{"field": name, "message": "unreachable"} for name in failing],
            )
        return ReadyOut(status="ok", checks=checks)

    @get("/metrics", summary="Prometheus metrics (all of them with the metrics token, else the process's own)")
    async def metrics(self, request: Request, state: State) -> Response[bytes]:
        operator = is_operator(request, state.settings)
        body = await anyio.to_thread.run_sync(state.metrics.render, operator)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _database_ok(state: State) -> bool:
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as e:
        if unavailable(e):
            state.database.failed(e)  # logged once per outage
        else:
            log.warning("readiness: database unusable: %s", e)
        return False
