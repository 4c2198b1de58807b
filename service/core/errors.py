"""What the domain services refuse, and why: one small hierarchy, no HTTP in it.

A service raises these; the HTTP edge turns each into a problem+json response in one place (the exception
handlers of service.http.problems, which hold the status of each class). `errors` entries name a `field` (a
dotted path into the request: `spec.teachers.0.model`) or a dataset `line`, each with its `message`.

`code` and `title` say what kind of refusal it is when a class's own is too general (an invalid dataset is an
`Invalid` with code "invalid-dataset"); they become the problem's `type` and `title`.
"""

from __future__ import annotations

from typing import Any

FieldError = dict[str, Any]  # {"field": "spec.data.train", "message": "..."} or {"line": 3, "message": "..."}


def describe(errors: list[FieldError]) -> str:
    """One line for several field errors: `field: message; field: message`."""
    detail = "; ".join(f"{e['field']}: {e['message']}" if e.get("field") else e["message"] for e in errors)
    return detail or "validation failed"


class DomainError(Exception):
    """A request the domain refuses: `detail` says why, `errors` which parts of the request."""

    code: str | None = None  # None: the class's default kind
    title: str | None = None

    def __init__(self, detail: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors: list[FieldError] = errors or []


class NotFound(DomainError):
    """No such object in the caller's project (or no longer usable: a deleted dataset, a removed file)."""

    def __init__(self, what: str, id_: str, detail: str | None = None) -> None:
        super().__init__(detail or f"{what} {id_!r} not found")
        self.what = what
        self.id = id_


class Conflict(DomainError):
    """The object exists but its state forbids this now (a finished job cancelled, a dataset in use deleted)."""


class Invalid(DomainError):
    """One field of the request is not acceptable."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", [{"field": field, "message": message}])


class InvalidFields(Invalid):
    """Several fields of the request are not acceptable, all reported at once."""

    def __init__(self, errors: list[FieldError]) -> None:
        DomainError.__init__(self, describe(errors), errors)


class InvalidDataset(Invalid):
    """An uploaded dataset's content is not valid; `errors` name its bad lines."""

    code = "invalid-dataset"
    title = "Invalid dataset"

    def __init__(self, detail: str, errors: list[FieldError]) -> None:
        DomainError.__init__(self, detail, errors)


class TooMany(DomainError):
    """A bound on what runs at once is reached; trying again after `retry_after` seconds may succeed."""

    def __init__(self, detail: str, retry_after: int, *, code: str | None = None, title: str | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        if code is not None:
            self.code = code
        if title is not None:
            self.title = title
