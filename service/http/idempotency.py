"""The HTTP edge of a write: the request's transaction, committed here, and `Idempotency-Key` on POST.

A handler that writes is decorated, below its route decorator; the domain services it calls write and flush,
never commit (service.core.transaction):

    @post("/", summary="Create a job")
    @idempotent
    def create(self, data: JSONBody[JobCreate], session: SessionDep, caller: CallerDep, state: State) -> JobOut:
        return job_out(service.create_job(session, ...), [])

`@writes` runs the handler in a worker thread and commits its session (then the services' after-commit
actions run: service.core.transaction); on any error it rolls back and undoes.

`@idempotent` (for POSTs) does the same and, with an `Idempotency-Key` header, makes the request safe to send
again. The same key and the same request replay the first response (`Idempotent-Replayed: true`) without running
the handler; the same key with another request is a 422. The request is identified by a fingerprint: sha256 over
method, path and body, a JSON body canonicalised first (sorted keys, no whitespace, so a client that
re-serialises the same object still matches). A multipart upload's boundary is random per request, so there the
handler's body parameter fingerprints itself (`@idempotent(body="upload")`: the fields and the sha256 of the file,
service.domain.uploaded.Upload.fingerprint). Only successful responses are recorded: a failed request wrote nothing,
so running it again is harmless.

The record of the response is added to the same transaction as what the handler created, and committed with
it: a crash leaves both or neither. Of two concurrent requests with one key, both may run the handler, but only
one commit can insert the record (its primary key is the project and the key): the other's commit fails, rolls
back (undoing what it had done, e.g. the file it had moved into place), and replays the winner's response, or is
a 422 if its request was another.

The decorators take what they need from the handler's parameters `request`, `session`, `caller` and
`idempotency_key` (service.http.deps), adding to its signature those it does not declare.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread
import msgspec
from litestar import Request, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core import transaction
from service.core.db.models import IdempotencyRecord
from service.http.deps import CallerDep, IdempotencyKeyDep, SessionDep
from service.http.problems import Problem

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 200

Handler = Callable[..., Any]


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    request_hash: str


class Fingerprinted(Protocol):
    """A request body that identifies its request itself (an upload: not its bytes, which vary per request)."""

    def fingerprint(self, method: str, path: str) -> str: ...


def fingerprint(method: str, path: str, body: bytes) -> str:
    try:
        body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        pass  # not JSON: the raw bytes are the request
    h = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def header_key(request: Request) -> str | None:
    key = request.headers.get(HEADER.lower())
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Problem(
            422,
            f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable characters",
            errors=[{"field": HEADER, "message": f"must be 1-{MAX_KEY_LENGTH} printable characters"}],
        )
    return key


def provide_idempotency_key(request: Request) -> str | None:
    """Dependency `idempotency_key`: the header's key, checked before any body (an upload) is received."""
    return header_key(request)


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]

    def response(self) -> Response[Any]:
        return Response(self.body, status_code=self.status_code, headers={"Idempotent-Replayed": "true"})


def find(session: Session, project_id: str, idem: IdempotencyKey) -> Replay | None:
    """The recorded response for this key, if any; 422 if the key was used for another request."""
    record = session.get(IdempotencyRecord, (project_id, idem.key))
    if record is None:
        return None
    if record.request_hash != idem.request_hash:
        message = "this key was already used with a different request"
        raise Problem(
            422,
            f"{HEADER}: {message}",
            errors=[{"field": HEADER, "message": message}],
            slug="idempotency-key-reused",
            title="Idempotency key reused",
        )
    return Replay(record.status_code, record.response)


def _create(
    session: Session, project_id: str, idem: IdempotencyKey | None, status_code: int, call: Callable[[], Any]
) -> Response[Any]:
    """Replay, or run the handler and commit its rows with the record of its response (in a worker thread)."""
    if idem is not None and (replay := find(session, project_id, idem)) is not None:
        return replay.response()
    try:
        body = msgspec.to_builtins(call())
        if idem is not None:
            session.add(
                IdempotencyRecord(
                    project_id=project_id,
                    key=idem.key,
                    request_hash=idem.request_hash,
                    status_code=status_code,
                    response=body,
                )
            )
        transaction.commit(session)
    except IntegrityError:  # a concurrent request with the same key committed first (else a bug: raised)
        _abandon(session)
        replay = find(session, project_id, idem) if idem is not None else None
        if replay is None:
            raise
        return replay.response()
    except BaseException:
        _abandon(session)
        raise
    return Response(body, status_code=status_code)


def _write(session: Session, call: Callable[[], Any]) -> Any:
    try:
        result = call()
        transaction.commit(session)
    except BaseException:
        _abandon(session)
        raise
    return result


def _abandon(session: Session) -> None:
    """Roll back and undo; a failing rollback (the database is gone) must not hide the error being handled."""
    with contextlib.suppress(Exception):
        transaction.abandon(session)


# --------------------------------------------------------------------------------------- decorators


def idempotent(handler: Handler | None = None, *, body: str | None = None) -> Any:
    """Decorate a POST handler (below its route decorator): one committed transaction, Idempotency-Key honoured.
    `body` names the handler's parameter that fingerprints the request (`Fingerprinted`) when its raw bytes
    cannot (a multipart upload, or a body the handler reads itself); by default the raw body does. The handler
    returns the response object (a msgspec struct); the route's status code is the recorded status."""

    def decorate(handler: Handler) -> Callable[..., Awaitable[Response[Any]]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Response[Any]:
            request: Request = kwargs["request"]
            key: str | None = kwargs["idempotency_key"]
            idem = None
            if key is not None:
                method, path = request.method, request.url.path
                received: Fingerprinted | None = kwargs[body] if body else None
                request_hash = (
                    received.fingerprint(method, path)
                    if received is not None
                    else fingerprint(method, path, await request.body())  # cached: `data` parsed these bytes
                )
                idem = IdempotencyKey(key, request_hash)
            call = functools.partial(handler, *args, **{k: v for k, v in kwargs.items() if k not in added})
            run = functools.partial(
                _create, kwargs["session"], kwargs["caller"].project_id, idem, request.route_handler.status_code, call
            )
            return await anyio.to_thread.run_sync(run)

        added = _adopt(
            wrapper,
            handler,
            {"request": Request, "session": SessionDep, "caller": CallerDep, "idempotency_key": IdempotencyKeyDep},
        )
        return wrapper

    return decorate(handler) if handler is not None else decorate


def writes(handler: Handler) -> Callable[..., Awaitable[Any]]:
    """Decorate a handler that writes but is no POST (a DELETE): run in a worker thread, its session committed."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = functools.partial(handler, *args, **{k: v for k, v in kwargs.items() if k not in added})
        return await anyio.to_thread.run_sync(functools.partial(_write, kwargs["session"], call))

    added = _adopt(wrapper, handler, {"session": SessionDep})
    return wrapper


def _adopt(wrapper: Callable[..., Any], handler: Handler, needs: dict[str, Any]) -> frozenset[str]:
    """Give `wrapper` the handler's name and signature, plus the parameters of `needs` the handler lacks (keyword
    only, injected by Litestar by name). Returns those added: the handler does not receive them."""
    if inspect.iscoroutinefunction(handler):
        raise TypeError(f"{handler.__qualname__}: decorate a plain function; it runs in a worker thread")
    functools.update_wrapper(wrapper, handler)
    signature = inspect.signature(handler)
    added = {name: kind for name, kind in needs.items() if name not in signature.parameters}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind) for name, kind in added.items()]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**handler.__annotations__, **added}
    return frozenset(added)
