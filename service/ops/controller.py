"""`/healthz` (the process answers), `/readyz` (database and broker reachable), `/metrics` (Prometheus)."""

from __future__ import annotations

import logging

import anyio.to_thread
from litestar import Controller, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service import queue
from service.api.problems import Problem
from service.api.schemas import ReadyOut

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
            raise Problem(503, f"not ready: {' and '.join(failing)} unreachable",
                          errors=[{"field": name, "message": "unreachable"} for name in failing])
        return ReadyOut(status="ok", checks=checks)

    @get("/metrics", summary="Prometheus metrics", sync_to_thread=True)
    def metrics(self, state: State) -> Response[bytes]:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _database_ok(state: State) -> bool:
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as e:
        log.warning("readiness: database unreachable: %s", e)
        return False
