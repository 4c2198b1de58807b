"""RFC 9457 problem details: every 4xx/5xx leaves the API as `application/problem+json`.

This is the one place refusals become responses. The domain services raise service.core.errors' classes, which know
nothing of HTTP; `problem_for` gives each its status (NotFound 404, Conflict 409, Invalid 422, TooMany 429 with
Retry-After). The HTTP edge itself (auth, uploads, media types, Idempotency-Key) raises `Problem`, a response
already. The exception handlers below also turn Litestar's own errors (validation, bad JSON, unknown route,
wrong method) into the same shape, so a client parses one format:

    {"type": "urn:distillery:problem:validation-error", "title": "Validation failed", "status": 422,
     "detail": "spec.training.steps: Input should be greater than 0",
     "errors": [{"field": "spec.training.steps", "message": "Input should be greater than 0"}]}

Each entry of `errors` names a `field` (dotted path into the request) or a dataset `line`.

A request that fails because the database cannot serve (down, restarting, locked) is a 503 with `Retry-After`,
logged once per outage by service.core.db.availability rather than with a traceback per request.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.types import ExceptionHandlersMap
from pydantic import ValidationError

from service.core.db.availability import UNAVAILABLE_TYPES, unavailable
from service.core.errors import Conflict, DomainError, FieldError, Invalid, NotFound, TooMany, describe

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
DATABASE_RETRY_AFTER_SECONDS = 5  # what a 503 for an unavailable database tells clients to wait

# status -> (type slug, title) for problems raised without a more specific slug
_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    416: ("range-not-satisfiable", "Range not satisfiable"),
    422: ("validation-error", "Validation failed"),
    429: ("too-many-requests", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    503: ("service-unavailable", "Service unavailable"),
}


def problem_type(slug: str) -> str:
    return f"urn:distillery:problem:{slug}"


class Problem(Exception):
    """An error response the HTTP edge means to give; `errors` entries are {"field"|"line": ..., "message": ...}."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        default_slug, default_title = _DEFAULTS.get(status, ("error", "Error"))
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.slug = slug or default_slug
        self.title = title or default_title
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "type": problem_type(self.slug),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": self.errors,
        }

    def to_response(self) -> Response:
        return Response(self.body(), status_code=self.status, media_type=PROBLEM_JSON, headers=self.headers)


# the status of each kind of domain error, most specific first (an unlisted DomainError is a plain 400)
_DOMAIN_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (Invalid, 422),
    (TooMany, 429),
)


def problem_for(exc: DomainError) -> Problem:
    """The response for a refusal of the domain services."""
    status = next((status for cls, status in _DOMAIN_STATUS if isinstance(exc, cls)), 400)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooMany) else None
    return Problem(status, exc.detail, errors=exc.errors, slug=exc.code, title=exc.title, headers=headers)


def invalid(field: str, message: str) -> Problem:
    """422 for one bad field."""
    return Problem(422, f"{field}: {message}", errors=[{"field": field, "message": message}])


def from_field_errors(errors: list[FieldError], status: int = 422) -> Problem:
    return Problem(status, describe(errors), errors=errors)


def pydantic_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """pydantic errors as [{"field": "spec.training.steps", "message": ...}]."""
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        field = ".".join(p for p in (prefix, loc) if p)
        out.append({"field": field or "body", "message": err["msg"]})
    return out


# ------------------------------------------------------------------------------------------- handlers


def handle_problem(_: Request, exc: Problem) -> Response:
    return exc.to_response()


def handle_domain_error(_: Request, exc: DomainError) -> Response:
    return problem_for(exc).to_response()


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    """Litestar's own exceptions, reshaped. Field-level validation failures become 422 with named fields."""
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        errors = [_litestar_error(e) for e in exc.extra]
        problem = from_field_errors(errors)
    else:
        status = exc.status_code
        detail = exc.detail
        if status == 404 and detail == "Not Found":
            detail = f"no route for {request.method} {request.url.path}"
        elif status == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        elif status == 400 and isinstance(exc.__cause__, SerializationException):
            problem = Problem(
                400,
                f"the body is not valid JSON: {detail}",
                errors=[{"field": "body", "message": f"not valid JSON: {detail}"}],
            )
            return _with_headers(problem, exc).to_response()
        problem = Problem(status, detail)
    return _with_headers(problem, exc).to_response()


def _with_headers(problem: Problem, exc: HTTPException) -> Problem:
    problem.headers = {**(exc.headers or {}), **problem.headers}
    if problem.status == 401:
        problem.headers.setdefault("WWW-Authenticate", 'Bearer realm="distillery"')
    return problem


def handle_too_deep(request: Request, exc: RecursionError) -> Response:
    """JSON nested deeper than a parser's stack (a body of 1,000 `[`): the request's fault, not ours."""
    log.warning("%s %s: body nested too deeply to parse", request.method, request.url.path)
    return Problem(
        400, "the body is nested too deeply to parse", errors=[{"field": "body", "message": "nested too deeply"}]
    ).to_response()


def handle_database_error(request: Request, exc: Exception) -> Response:
    """503 + Retry-After when the database cannot serve right now (logged once per outage, no traceback);
    any other database error is a bug, answered and logged as one."""
    if not unavailable(exc):
        return handle_internal_error(request, exc)
    request.app.state.database.failed(exc)
    return Problem(
        503, "the database is unavailable; retry shortly", headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}
    ).to_response()


def handle_internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "an internal error occurred; it has been logged").to_response()


def _litestar_error(e: Any) -> dict[str, Any]:
    if not isinstance(e, dict):
        return {"field": "body", "message": str(e)}
    key = e.get("key")
    source = e.get("source")
    # Query/header/path parameters are named as they are sent; body fields by their dotted path.
    field = key if key else ("body" if source in (None, "body") else str(source))
    return {"field": field, "message": str(e.get("message", "invalid value"))}


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    Problem: handle_problem,
    DomainError: handle_domain_error,
    HTTPException: handle_http_exception,
    RecursionError: handle_too_deep,
    **{database_error: handle_database_error for database_error in UNAVAILABLE_TYPES},
    Exception: handle_internal_error,
}


def status_for(exc: Exception) -> int:
    """The status the handlers above answer `exc` with. For the metrics middleware: an error raised outside a
    route handler (by the auth middleware) is answered further out, so the middleware sees only the error."""
    if isinstance(exc, Problem):
        return exc.status
    if isinstance(exc, DomainError):
        return problem_for(exc).status
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, RecursionError):
        return 400
    return 503 if unavailable(exc) else 500


__all__ = [
    "EXCEPTION_HANDLERS",
    "PROBLEM_JSON",
    "Problem",
    "from_field_errors",
    "invalid",
    "problem_for",
    "pydantic_errors",
    "problem_type",
    "status_for",
]


def json_body_guard(connection, _handler) -> None:
    """A route that reads a JSON body refuses any other declared media type (415), before parsing it."""
    content_type = connection.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = media or "none"
        raise Problem(
            415,
            f"Content-Type: expected application/json, got {shown}",
            errors=[{"field": "Content-Type", "message": f"expected application/json, got {shown}"}],
        )
