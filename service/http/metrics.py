"""Prometheus metrics of one app, in two views.

- The operator view: this process's memory, CPU and garbage collector; requests by route template and status;
  latency; and jobs by status (counted from the database at scrape time, so every API replica reports the same
  truth). It describes every tenant's activity together, so it is shown only to a scrape that presents
  `Authorization: Bearer <DISTILLERY_METRICS_TOKEN>`.
- The public view, for any other scrape (and for every scrape while no token is set): the process metrics
  alone, nothing counted from requests or the database.

A wrong token is a 401 and counts as a failed authentication (service.http.auth_limit).
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import cast

from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db.availability import Availability, unavailable
from service.core.db.models import Job
from service.http.problems import status_for
from service.http.schemas import JOB_STATUSES

log = logging.getLogger(__name__)


class JobsByStatus:
    """A collector: `distillery_jobs{status}` from one GROUP BY per scrape."""

    def __init__(self, sessions: sessionmaker[Session], database: Availability) -> None:
        self.sessions = sessions
        self.database = database

    def describe(self):
        return [GaugeMetricFamily("distillery_jobs", "Jobs by status", labels=["status"])]

    def collect(self):
        family = GaugeMetricFamily("distillery_jobs", "Jobs by status", labels=["status"])
        try:
            with self.sessions() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        except Exception as e:  # a scrape must not fail because the database does; /readyz reports that
            if unavailable(e):
                self.database.failed(e)
            else:
                log.warning("jobs gauge unavailable: %s", e)
            return
        for status in JOB_STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family


class AppMetrics:
    def __init__(self, sessions: sessionmaker[Session], database: Availability) -> None:
        # per app, so several apps (tests) never share counters
        self.public = CollectorRegistry()
        self.registry = CollectorRegistry()  # the operator view: the public one and everything below
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # the process's own
            self.public.register(collector)
            self.registry.register(collector)
        self.requests = Counter(
            "distillery_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "distillery_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.registry.register(JobsByStatus(sessions, database))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, operator: bool) -> bytes:
        return generate_latest(self.registry if operator else self.public)


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    """Count and time every routed request by its route template (`/v1/jobs/{job_id:str}`), not its path."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method = cast("HTTPScope", scope)["method"]
        status = 500
        started = perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_and_note)
        except Exception as e:  # raised by middleware further in (auth): answered outside
            status = status_for(e)
            raise
        finally:
            metrics: AppMetrics = scope["litestar_app"].state.metrics
            metrics.observe(method, scope.get("path_template") or "unmatched", status, perf_counter() - started)

    return middleware
