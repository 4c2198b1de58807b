"""`/v1/jobs`: create, list, get, cancel; events (list and SSE stream), metrics, checkpoints, artifacts."""

from __future__ import annotations

import dataclasses

import anyio.to_thread
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.params import FromQuery, JSONBody, Parameter
from litestar.response import ServerSentEvent
from sqlalchemy.orm import Session, sessionmaker

from service.domain import estimates
from service.domain import jobs as service
from service.http.deps import ID_PATTERN, CallerDep, PathId, SessionDep
from service.http.idempotency import idempotent, writes
from service.http.pagination import DEFAULT_LIMIT, MAX_LIMIT
from service.http.problems import invalid, json_body_guard
from service.http.schemas import (
    ArtifactList,
    CacheUseOut,
    CheckpointList,
    EstimateOut,
    EventPage,
    JobCreate,
    JobOut,
    JobPage,
    MetricList,
    artifact_out,
    checkpoint_out,
    event_out,
    job_out,
    metric_out,
)
from service.http.streams import EventHub

MAX_EVENT_PAGE = 1000


class JobController(Controller):
    path = "/jobs"
    tags = ["jobs"]

    @post("/", summary="Create a job", request_max_body_size=1 << 20, guards=[json_body_guard])
    @idempotent
    def create(self, data: JSONBody[JobCreate], session: SessionDep, caller: CallerDep, state: State) -> JobOut:
        spec = data.spec.model_dump(mode="json")
        job = service.create_job(session, state.enqueuer, caller.project_id, data.kind, spec, data.parent_id)
        return job_out(*service.job_view(session, job))

    @post(
        "/estimate",
        summary="Estimate a job before creating it",
        description="The same body as `POST /v1/jobs`, checked the same way; nothing is created. Gives the "
        "teacher caches an offline distillation would reuse or build first, the tokens it trains on (an upper "
        "bound), a first-order memory figure from the registered models' sizes, and a time from this project's "
        "earlier runs of the same student (null when there is none).",
        status_code=200,
        request_max_body_size=1 << 20,
        guards=[json_body_guard],
        sync_to_thread=True,
    )
    def estimate(self, data: JSONBody[JobCreate], session: SessionDep, caller: CallerDep) -> EstimateOut:
        est = estimates.estimate_job(session, caller.project_id, data.kind, data.spec.model_dump(mode="json"))
        return EstimateOut(
            kind=data.kind,
            tokens=est.tokens,
            memory_bytes=est.memory_bytes,
            seconds=est.seconds,
            teacher_caches=[CacheUseOut(**dataclasses.asdict(c)) for c in est.teacher_caches],
            notes=est.notes,
        )

    @get("/", sync_to_thread=True, summary="List jobs, newest first")
    def list(
        self,
        session: SessionDep,
        caller: CallerDep,
        status: FromQuery[str | None] = None,
        kind: FromQuery[str | None] = None,
        parent_id: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
        limit: int = Parameter(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
        after: str | None = Parameter(default=None, max_length=80, pattern=ID_PATTERN),
    ) -> JobPage:
        jobs = service.list_jobs(session, caller.project_id, status, kind, limit, after, parent_id)
        return JobPage(data=[job_out(*view) for view in jobs.items], has_more=jobs.has_more)

    @get("/{job_id:str}", sync_to_thread=True, summary="Get a job")
    def retrieve(self, session: SessionDep, caller: CallerDep, job_id: PathId) -> JobOut:
        return job_out(*service.get_job_view(session, caller.project_id, job_id))

    @post("/{job_id:str}/cancel", summary="Cancel a job", status_code=200)
    @idempotent
    def cancel(self, session: SessionDep, caller: CallerDep, job_id: PathId) -> JobOut:
        return job_out(*service.cancel_job(session, caller.project_id, job_id))

    @delete(
        "/{job_id:str}/files",
        status_code=200,
        summary="Delete a finished job's files",
        description="Frees the disk space of a finished job: its outputs, checkpoints and every attempt's "
        "files. Its events, metrics and summary stay; its artifacts are gone. 409 while the job "
        "or a job using its output is unfinished.",
    )
    @writes
    def delete_files(self, session: SessionDep, caller: CallerDep, state: State, job_id: PathId) -> dict:
        deleted = service.delete_job_files(session, state.settings.artifact_root, caller.project_id, job_id)
        return dataclasses.asdict(deleted)

    @get("/{job_id:str}/events", sync_to_thread=True, summary="A job's events, oldest first")
    def events(
        self,
        session: SessionDep,
        caller: CallerDep,
        job_id: PathId,
        after: int | None = Parameter(default=None, ge=0),
        limit: int = Parameter(default=MAX_EVENT_PAGE, ge=1, le=MAX_EVENT_PAGE),
    ) -> EventPage:
        events = service.list_events(session, caller.project_id, job_id, after, limit)
        return EventPage(data=[event_out(e) for e in events.items], has_more=events.has_more)

    @get(
        "/{job_id:str}/events/stream",
        summary="A job's events as server-sent events",
        description="Each event: `id` (resume with the Last-Event-ID header or `?after=`), `event` (its kind), "
        "`data` (the event object as JSON). Ends once the job has finished and its last events "
        "were sent. At most `streams_per_key` streams per API key are open at once (429 past it).",
    )
    async def stream(
        self,
        request: Request,
        caller: CallerDep,
        state: State,
        job_id: PathId,
        after: int | None = Parameter(default=None, ge=0),
    ) -> ServerSentEvent:
        factory: sessionmaker[Session] = state.sessions
        await anyio.to_thread.run_sync(_check_owner, factory, caller.project_id, job_id)
        last_id = request.headers.get("last-event-id")
        if last_id is not None:
            if not last_id.strip().isdigit():
                raise invalid("Last-Event-ID", "must be an event id (a non-negative integer)")
            after = int(last_id)
        hub: EventHub = state.streams
        return ServerSentEvent(
            hub.open(caller.key_id, job_id, after or 0),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @get("/{job_id:str}/metrics", sync_to_thread=True, summary="A job's logged metrics (all, or one name)")
    def metrics(
        self,
        session: SessionDep,
        caller: CallerDep,
        job_id: PathId,
        name: str | None = Parameter(default=None, max_length=80),
    ) -> MetricList:
        return MetricList(data=[metric_out(m) for m in service.list_metrics(session, caller.project_id, job_id, name)])

    @get("/{job_id:str}/checkpoints", sync_to_thread=True, summary="A job's checkpoints")
    def checkpoints(self, session: SessionDep, caller: CallerDep, job_id: PathId) -> CheckpointList:
        return CheckpointList(
            data=[checkpoint_out(c) for c in service.list_checkpoints(session, caller.project_id, job_id)]
        )

    @get("/{job_id:str}/artifacts", sync_to_thread=True, summary="A job's artifacts")
    def artifacts(self, session: SessionDep, caller: CallerDep, job_id: PathId) -> ArtifactList:
        return ArtifactList(data=[artifact_out(a) for a in service.list_artifacts(session, caller.project_id, job_id)])


def _check_owner(factory: sessionmaker[Session], project_id: str, job_id: str) -> None:
    with factory() as session:
        service.get_job(session, project_id, job_id)
