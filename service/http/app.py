"""The HTTP API of the server (REST under /v1: datasets, models, jobs, artifacts; see README.md and the
OpenAPI document at /schema): `create_app(settings)` builds the Litestar app; `distillery-server api` serves it.

Operations routes (/healthz, /readyz, /metrics, /schema) and the dashboard (`/`, `/static`) are open (the operator view of /metrics needs the
metrics token); everything under /v1 needs an API key and sees only the caller's project. Handlers are thin:
they parse, call a domain service (datasets, models_registry, jobs), and return. The services know nothing of
HTTP: their refusals (service.core.errors) become problem+json in service.http.problems, and the transaction of a
write, with its Idempotency-Key record, is committed at the edge (service.http.idempotency). This process
imports nothing of the worker (no MLX): the job specs, dataset formats and job statuses come from
`distillery_contract`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from sqlalchemy.orm import sessionmaker

from service.core.db.availability import availability_for
from service.core.db.session import engine_for
from service.core.queue import make_celery
from service.core.settings import Settings, get_settings
from service.domain.jobs import Enqueuer
from service.http.auth import ApiKeyMiddleware
from service.http.auth_limit import FailedAuthLimit
from service.http.controllers.artifacts import ArtifactController
from service.http.controllers.datasets import DatasetController
from service.http.controllers.jobs import JobController
from service.http.controllers.models import ModelController
from service.http.controllers.ops import OpsController
from service.http.dashboard import dashboard_routes, render_plugins
from service.http.deps import provide_caller, provide_session, provide_settings
from service.http.idempotency import provide_idempotency_key
from service.http.metrics import AppMetrics, metrics_middleware
from service.http.openapi import (
    publish_problem_responses,
    publish_pydantic_schemas,
    publish_query_enums,
    publish_success_content,
)
from service.http.problems import EXCEPTION_HANDLERS
from service.http.schemas import JOB_KINDS, JOB_STATUSES, request_models
from service.http.streams import EventHub
from service.http.uploads import UploadSlots


def _version() -> str:
    try:
        return version("distillery-server")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    sessions = sessionmaker(engine_for(settings.database_url), expire_on_commit=False)
    celery = make_celery(settings.broker_url)  # this app's own, so its broker_url is the one in `settings`
    database = availability_for(settings.database_url)
    state = State(
        {
            "settings": settings,
            "sessions": sessions,
            "celery": celery,
            "enqueuer": Enqueuer(celery),
            "database": database,
            "metrics": AppMetrics(sessions, database),
            "auth_failures": FailedAuthLimit(settings.auth_failure_burst, settings.auth_failure_per_second),
            "streams": EventHub(
                sessions, settings.events_poll_seconds, settings.streams_per_key, settings.streams_total
            ),
            "uploads": UploadSlots(settings.max_concurrent_uploads),
        }
    )

    v1 = Router(
        path="/v1",
        route_handlers=[DatasetController, ModelController, JobController, ArtifactController],
        middleware=[DefineMiddleware(ApiKeyMiddleware)],
        security=[{"bearer": []}],
    )
    app = Litestar(
        route_handlers=[OpsController, v1, *dashboard_routes()],
        dependencies={
            "session": Provide(provide_session),
            "caller": Provide(provide_caller, sync_to_thread=False),
            "settings": Provide(provide_settings, sync_to_thread=False),
            "idempotency_key": Provide(provide_idempotency_key, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[metrics_middleware],
        openapi_config=OpenAPIConfig(
            title="Distillery",
            version=_version(),
            path="/schema",
            render_plugins=render_plugins(),  # Swagger UI at /schema, ReDoc at /schema/redoc: assets served here
            description="Self-hosted knowledge distillation: datasets, models, jobs, artifacts.",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description="dst_<prefix>_<secret>")
                }
            ),
        ),
        state=state,
        debug=False,
    )
    publish_pydantic_schemas(app, request_models())
    publish_problem_responses(app)
    publish_success_content(app)
    publish_query_enums(app, {"GET /v1/jobs": {"status": JOB_STATUSES, "kind": JOB_KINDS}})
    return app
