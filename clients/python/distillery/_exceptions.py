"""Every error the SDK raises derives from `DistilleryError`; HTTP errors carry the RFC 9457 problem details."""

from __future__ import annotations

from typing import Any

import httpx


class DistilleryError(Exception):
    """Base of every error the SDK raises."""


class ConfigError(DistilleryError):
    """The client is misconfigured (bad config file, missing base URL...)."""


class APIConnectionError(DistilleryError):
    """The server could not be reached (after the retries)."""


class APIError(DistilleryError):
    """An error response. `problem` is the problem+json body; `errors` lists `{field|line, message}` items."""

    def __init__(self, status: int, problem: dict[str, Any], response: httpx.Response | None = None) -> None:
        self.status = status
        self.problem = problem
        self.response = response
        self.type = problem.get("type")
        self.title = problem.get("title")
        self.detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        super().__init__(f"{status}: {self.detail}")

    def lines(self) -> list[str]:
        """The detail as lines, every named field or line in it once: a detail that lists the errors (a
        dataset's bad lines) is kept as it is; one that does not gets the named errors after it."""
        detail = [" ".join(line.split()) for line in str(self.detail).splitlines() if line.strip()] or [""]
        text = " ".join(detail)
        named = [
            f"{e.get('field') or e.get('line')}: {e.get('message')}"
            for e in self.errors
            if (e.get("field") or e.get("line")) and str(e.get("message")) not in text
        ]
        if not named:
            return detail
        if len(detail) == 1 and len(named) == 1:
            return [f"{detail[0]} ({named[0]})"]
        return detail + named

    def one_line(self) -> str:
        """The detail, with the fields or lines named, on one line."""
        return "; ".join(self.lines())


class BadRequestError(APIError):
    """400 or 422: the request is invalid; `errors` names the fields."""


class AuthenticationError(APIError):
    """401: missing or unknown API key."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: no such object in your project."""


class ConflictError(APIError):
    """409: the object's state forbids the call (e.g. deleting a dataset a job uses)."""


class PayloadTooLargeError(APIError):
    """413."""


class RateLimitError(APIError):
    """429: slow down (the SDK already waited `Retry-After` and retried)."""


class ServerError(APIError):
    """5xx."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    422: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
}


def error_for(response: httpx.Response) -> APIError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": response.text[:500] or response.reason_phrase}
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, problem, response)


class JobFailedError(DistilleryError):
    """`wait()` saw the job end in `failed` or `cancelled`; `code` is `user_error` or `internal_error`."""

    def __init__(self, job: Any) -> None:
        self.job = job
        error = job.error
        self.code = error.code if error else None
        self.message = error.message if error else None
        what = f": {self.code}: {self.message}" if error else ""
        super().__init__(f"job {job.id} {job.status}{what}")


class WaitTimeout(DistilleryError, TimeoutError):
    """`wait(timeout=...)` ran out; the job goes on."""

    def __init__(self, job: Any, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.id} is still {job.status} after {timeout:g}s")


class ChecksumError(DistilleryError):
    """A downloaded file's sha256 differs from the server's; the partial file was removed."""


class JobWarningIssued(UserWarning):
    """Issued by `jobs.wait` when the finished job carries warnings (`Job.warnings`), e.g. that the run shipped
    the starting student because training did not improve it."""
