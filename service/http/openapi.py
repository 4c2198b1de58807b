"""What Litestar cannot infer for the OpenAPI document: request bodies of the handlers that parse their own
body (streamed multipart uploads, or JSON and multipart on one route), pydantic's own schemas of the request
models, the problem responses each operation can give, and the real media types of the non-JSON successes.

The document is built once and cached by Litestar's OpenAPI plugin; the `publish_*` functions amend that
cached document after the app is built, so every reader (`/schema/openapi.json`, the SDK's tests) sees it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from pydantic import BaseModel

from service.http.problems import PROBLEM_JSON


def _form_schema(fields: dict[str, str], required: list[str]) -> Schema:
    props: dict[str, Schema | Reference] = {
        name: Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY if kind == "binary" else None)
        for name, kind in fields.items()
    }
    return Schema(type=OpenAPIType.OBJECT, properties=props, required=required)


def multipart_body(
    fields: dict[str, str],
    required: list[str],
    json_fields: dict[str, str] | None = None,
    json_required: list[str] | None = None,
) -> type[Operation]:
    """An Operation class whose request body is a multipart form (`fields`: name -> "binary" | "string"),
    and optionally, as an alternative, a JSON object of string fields."""
    content = {"multipart/form-data": OpenAPIMediaType(schema=_form_schema(fields, required))}
    if json_fields:
        content["application/json"] = OpenAPIMediaType(schema=_form_schema(json_fields, json_required or []))

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(content=content, required=True)

    return WithBody


def publish_pydantic_schemas(app: Litestar, models: Iterable[type[BaseModel]]) -> None:
    """Replace the components Litestar derived from these pydantic models with pydantic's own JSON schema.

    Litestar's derivation drops what the API enforces on optional fields (`max_grad_norm: float | None` with
    `gt=0` loses its bound) and `extra="forbid"`; pydantic's schema is exactly what the API validates, so the
    published document accepts what the API accepts (less the cross-field rules no JSON schema can state)."""
    schemas = _document(app).components.schemas
    for model in models:
        if model.__name__ == "JobCreate":  # `spec` is checked by a plain validator: keep Litestar's oneOf of
            schemas["JobCreate"].additional_properties = False  # the spec models, and close the object
            continue
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in {**doc.pop("$defs", {}), model.__name__: doc}.items():
            schemas[name] = _to_schema(sub)


_RENAMED = {"not": "schema_not", "if": "schema_if", "else": "schema_else"}


@dataclass
class _SchemaWithNulls(Schema):
    """A `Schema` that also writes the keywords whose value is null (`"default": null`), which `Schema` cannot
    hold (its None means "absent"), so the published schema is pydantic's, keyword for keyword."""

    null_keys: tuple[str, ...] = ()

    @property
    def _exclude_fields(self) -> set[str]:
        return {*super()._exclude_fields, "null_keys"}

    def to_schema(self) -> dict[str, Any]:
        return {**super().to_schema(), **dict.fromkeys(self.null_keys)}

    __hash__ = Schema.__hash__


def _to_schema(node: Any) -> Any:
    """A JSON schema (dict) as Litestar's `Schema` objects (`$ref` as a `Reference`)."""
    if isinstance(node, list):
        return [_to_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return Reference(ref=node["$ref"])
    nulls = tuple(key for key, value in node.items() if value is None)
    if nulls:
        return _SchemaWithNulls(
            **_to_schema({k: v for k, v in node.items() if v is not None}).__dict__, null_keys=nulls
        )
    fields = {}
    for key, value in node.items():
        name = _RENAMED.get(key) or re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
        if name == "type":
            value = [OpenAPIType(v) for v in value] if isinstance(value, list) else OpenAPIType(value)
        elif name == "properties":
            value = {k: _to_schema(v) for k, v in value.items()}
        elif name in ("items", "additional_properties", "any_of", "one_of", "all_of", "schema_not"):
            value = _to_schema(value)
        fields[name] = value
    return Schema(**fields)


def _document(app: Litestar) -> OpenAPI:
    # the plugin's document is built once and cached; it is public in effect though its module is private
    return app.plugins.get(OpenAPIPlugin).provide_openapi()


# --------------------------------------------------------------------------------- problem responses


@dataclass(frozen=True)
class Route:
    """One operation of the document, as the rules below see it: `key` reads "GET /v1/jobs/{job_id}"."""

    method: str
    path: str
    operation: Operation

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


RouteRule = Callable[[Route], bool]


@dataclass(frozen=True)
class ProblemResponse:
    """One cause of a problem status, the operations it can happen on (`where`), and the headers it sends."""

    status: int
    description: str
    where: RouteRule
    headers: dict[str, str] = field(default_factory=dict)  # header name -> description


def under_v1(route: Route) -> bool:
    return route.path.startswith("/v1/")


def has_path_id(route: Route) -> bool:
    return "{" in route.path


def reads_body(route: Route) -> bool:
    return route.operation.request_body is not None


def takes_input(route: Route) -> bool:
    return bool(route.operation.parameters) or reads_body(route)


def only(*keys: str) -> RouteRule:
    return lambda route: route.key in keys


UPLOADS = ("POST /v1/datasets", "POST /v1/models")  # multipart streamed to disk (service.http.uploads)
JOB_CREATE = "POST /v1/jobs"
JOB_ESTIMATE = "POST /v1/jobs/estimate"
EVENT_STREAM = "GET /v1/jobs/{job_id}/events/stream"
DOWNLOAD = "GET /v1/artifacts/{artifact_id}/content"
METRICS = "GET /metrics"
RETRY_AFTER = {"Retry-After": "Seconds to wait before retrying."}

# Each cause of a problem and the operations it can happen on. Causes of one status are merged into one
# response. A test reads the statuses back from the document, and the API fuzz checks that every status the
# app answers is listed for its operation.
PROBLEM_RESPONSES: tuple[ProblemResponse, ...] = (
    ProblemResponse(400, "The body is not valid JSON or multipart/form-data, or is nested too deeply.", reads_body),
    ProblemResponse(
        401,
        "Missing, malformed, unknown or revoked API key (`Authorization: Bearer <key>`).",
        under_v1,
        {"WWW-Authenticate": '`Bearer realm="distillery"`'},
    ),
    ProblemResponse(401, "A wrong metrics token (checked only when the server has one).", only(METRICS)),
    ProblemResponse(404, "No such object in the caller's project.", has_path_id),
    ProblemResponse(409, "The dataset is used by an unfinished job.", only("DELETE /v1/datasets/{dataset_id}")),
    ProblemResponse(409, "The job has already finished.", only("POST /v1/jobs/{job_id}/cancel")),
    ProblemResponse(
        409,
        "The job, or a job using its output, is unfinished; or its files are a shared teacher cache.",
        only("DELETE /v1/jobs/{job_id}/files"),
    ),
    ProblemResponse(413, "The body is larger than the limit.", only(JOB_CREATE, JOB_ESTIMATE, *UPLOADS)),
    ProblemResponse(415, "Content-Type is not one this operation reads.", only(JOB_CREATE, JOB_ESTIMATE, *UPLOADS)),
    ProblemResponse(416, "The Range is outside the artifact.", only(DOWNLOAD), {"Content-Range": "`bytes */<size>`"}),
    ProblemResponse(
        422,
        "Validation failed: `errors` names each bad field (a parameter, a header or a path into "
        "the body) or dataset line. An Idempotency-Key reused for another request is one too.",
        takes_input,
    ),
    ProblemResponse(
        429,
        "Too many failed authentications from this address.",
        lambda route: under_v1(route) or route.key == METRICS,
        RETRY_AFTER,
    ),
    ProblemResponse(
        429, "The server is already receiving as many uploads as it takes at once.", only(*UPLOADS), RETRY_AFTER
    ),
    ProblemResponse(
        429,
        "This API key (or this server) already has as many event streams open as allowed.",
        only(EVENT_STREAM),
        RETRY_AFTER,
    ),
    ProblemResponse(503, "The database is unavailable.", under_v1, RETRY_AFTER),
    ProblemResponse(503, "The database or the broker is unreachable.", only("GET /readyz")),
    ProblemResponse(507, "The server's disk is full: the upload was not stored.", only(*UPLOADS)),
)

PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="Problem",
    description="RFC 9457 problem details: every 4xx and 5xx response of the API.",
    required=["type", "title", "status", "detail", "errors"],
    properties={
        "type": Schema(
            type=OpenAPIType.STRING,
            description="`urn:distillery:problem:<slug>`: the kind of problem, stable for programs to test.",
        ),
        "title": Schema(type=OpenAPIType.STRING, description="A short summary of the kind."),
        "status": Schema(type=OpenAPIType.INTEGER, minimum=400, maximum=599, description="The HTTP status."),
        "detail": Schema(type=OpenAPIType.STRING, description="What was wrong with this request."),
        "errors": Schema(type=OpenAPIType.ARRAY, items=Reference(ref="#/components/schemas/ProblemError")),
    },
)
PROBLEM_ERROR_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="ProblemError",
    description="One thing wrong: a `field` (a parameter, a header, or a dotted path into the body) or a "
    "dataset `line`.",
    required=["message"],
    properties={
        "field": Schema(type=OpenAPIType.STRING),
        "line": Schema(type=OpenAPIType.INTEGER, minimum=1),
        "message": Schema(type=OpenAPIType.STRING),
    },
    any_of=[Schema(required=["field"]), Schema(required=["line"])],
)


def publish_problem_responses(app: Litestar, rules: tuple[ProblemResponse, ...] = PROBLEM_RESPONSES) -> None:
    """Give every operation the problem responses `rules` say it can answer, and no others.

    Litestar documents a 400 of its own JSON shape on each operation with parameters, which the API never sends
    (its handlers answer `application/problem+json`, a bad parameter as a 422): it is dropped. Each status gets
    the shared `Problem` schema, its causes' descriptions and their headers."""
    document = _document(app)
    document.components.schemas["Problem"] = PROBLEM_SCHEMA
    document.components.schemas["ProblemError"] = PROBLEM_ERROR_SCHEMA
    problem = OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))
    for route in _routes(document):
        responses = {
            status: response
            for status, response in (route.operation.responses or {}).items()
            if not status.startswith(("4", "5"))
        }
        causes: dict[int, list[ProblemResponse]] = {}
        for rule in rules:
            if rule.where(route):
                causes.setdefault(rule.status, []).append(rule)
        for status, matched in causes.items():
            headers: dict[str, OpenAPIHeader | Reference] = {
                name: OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description=text)
                for rule in matched
                for name, text in rule.headers.items()
            }
            responses[str(status)] = OpenAPIResponse(
                description=" ".join(rule.description for rule in matched),
                content={PROBLEM_JSON: problem},
                headers=headers or None,
            )
        route.operation.responses = dict(sorted(responses.items()))


def publish_query_enums(app: Litestar, enums: dict[str, dict[str, tuple[str, ...]]]) -> None:
    """Give query parameters their allowed values (`enums`: route key -> parameter -> values). The handlers take
    a plain string and check it themselves (an unknown value is a 422 naming the choices), so the type cannot
    carry the enum."""
    for route in _routes(_document(app)):
        for parameter in route.operation.parameters or []:
            if isinstance(parameter, Reference):
                continue
            values = enums.get(route.key, {}).get(parameter.name)
            if values is not None and parameter.param_in == "query":
                parameter.schema = Schema(type=OpenAPIType.STRING, enum=list(values))


@dataclass(frozen=True)
class SuccessContent:
    """A success response that is not JSON: its status, description, media type and body schema."""

    status: int
    description: str
    media_type: str
    schema: Schema


_BINARY = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)

# What the non-JSON successes really send (Litestar documents each as application/json): route key -> responses
SUCCESS_CONTENT: dict[str, tuple[SuccessContent, ...]] = {
    METRICS: (
        SuccessContent(
            200, "Prometheus metrics (text exposition format).", "text/plain", Schema(type=OpenAPIType.STRING)
        ),
    ),
    EVENT_STREAM: (
        SuccessContent(
            200, "The job's events as server-sent events.", "text/event-stream", Schema(type=OpenAPIType.STRING)
        ),
    ),
    DOWNLOAD: (
        SuccessContent(200, "The whole file, in the artifact's own content type.", "*/*", _BINARY),
        SuccessContent(206, "The requested byte range (Content-Range says which).", "*/*", _BINARY),
    ),
}


def publish_success_content(app: Litestar, content: dict[str, tuple[SuccessContent, ...]] = SUCCESS_CONTENT) -> None:
    """Replace the successes of `content`'s routes with what they really send."""
    for route in _routes(_document(app)):
        responses = route.operation.responses or {}
        for success in content.get(route.key, ()):
            responses[str(success.status)] = OpenAPIResponse(
                description=success.description, content={success.media_type: OpenAPIMediaType(schema=success.schema)}
            )
        route.operation.responses = dict(sorted(responses.items()))


def document_routes(app: Litestar) -> list[Route]:
    """The operations of the app's document, as the rules of PROBLEM_RESPONSES see them."""
    return _routes(_document(app))


def _routes(document: OpenAPI) -> list[Route]:
    routes = []
    for path, item in (document.paths or {}).items():
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(item, method, None)
            if operation is not None:
                routes.append(Route(method.upper(), path, operation))
    return routes
