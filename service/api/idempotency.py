"""`Idempotency-Key` on POST: the same key and request replay the first response; another request under the
same key is a 422.

The request fingerprint is sha256 over method, path and body. A JSON body is canonicalised first (sorted keys,
no whitespace), so a client that re-serialises the same object still matches; a multipart upload is
fingerprinted by its fields and the sha256 of its file (see service.api.uploads), because the multipart
boundary is random per request. Only successful responses are recorded: a failed request wrote nothing, so
running it again is harmless.

The record is written in the same transaction as what the request created, so two concurrent requests with
one key cannot both create: the second commit hits the primary key, rolls back, and replays the first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.api.problems import Problem
from service.db.models import IdempotencyRecord

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 200


@dataclass(frozen=True)
class IdempotencyKey:
    key: str
    request_hash: str


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


async def provide_idempotency(request: Request) -> IdempotencyKey | None:
    """Dependency for JSON POSTs: the key and the fingerprint of the request, or None without a key."""
    key = header_key(request)
    if key is None:
        return None
    body = await request.body()  # cached by Litestar: the handler's `data` parses the same bytes
    return IdempotencyKey(key, fingerprint(request.method, request.url.path, body))


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]

    def response(self) -> Response:
        return Response(self.body, status_code=self.status_code, headers={"Idempotent-Replayed": "true"})


def find(session: Session, project_id: str, idem: IdempotencyKey | None) -> Replay | None:
    """The recorded response for this key, if any; 422 if the key was used for another request."""
    if idem is None:
        return None
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


def remember(
    session: Session, project_id: str, idem: IdempotencyKey | None, status_code: int, body: dict[str, Any]
) -> None:
    """Add the response to the current transaction (nothing without a key)."""
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


def commit(session: Session, project_id: str, idem: IdempotencyKey | None) -> Replay | None:
    """Commit; if a concurrent request with the same key committed first, roll back and return its response."""
    try:
        session.commit()
        return None
    except IntegrityError:
        session.rollback()
        if idem is None:
            raise
        replay = find(session, project_id, idem)
        if replay is None:
            raise
        return replay
