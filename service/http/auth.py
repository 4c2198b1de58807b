"""API keys and the authentication middleware.

A key reads `dst_<prefix>_<secret>`. Only its sha256 is stored; `prefix` (8 hex digits, not secret) finds the
candidate rows, and the hashes are compared in constant time. Every request under /v1 carries
`Authorization: Bearer <key>`; the caller it resolves to (a project) scopes every query of the request.

Failed authentication is limited per client address (service.http.auth_limit): past the limit a request is a
429 before its key is looked up. The operator token of /metrics (`DISTILLERY_METRICS_TOKEN`) is checked here
too, under the same limit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

import anyio.to_thread
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db.models import ApiKey, Project, utcnow
from service.core.settings import Settings
from service.http.auth_limit import FailedAuthLimit
from service.http.schemas import as_utc

KEY_PREFIX = "dst"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # write last_used_at at most this often per key


@dataclass(frozen=True)
class Caller:
    """Who is calling: the project every query is scoped to, and the key used."""

    project_id: str
    project_name: str
    key_id: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None. The secret may itself contain underscores."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalars(select(Project).where(Project.name == name)).first()
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_api_key(session: Session, project_name: str) -> tuple[ApiKey, str]:
    """A new key for the project (created if needed). Returns (row, the key): the key is never stored."""
    project = get_or_create_project(session, project_name)
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(project_id=project.id, prefix=prefix, key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return row, key


def revoke_api_key(session: Session, key_id_or_prefix: str) -> int:
    """Revoke keys by id or prefix; returns how many were revoked."""
    rows = session.scalars(
        select(ApiKey).where(
            (ApiKey.id == key_id_or_prefix) | (ApiKey.prefix == key_id_or_prefix), ApiKey.revoked_at.is_(None)
        )
    ).all()
    for row in rows:
        row.revoked_at = utcnow()
    return len(rows)


def resolve_key(session: Session, key: str) -> Caller | None:
    """The caller a presented key belongs to; None for malformed, unknown or revoked keys."""
    parts = split_key(key)
    if parts is None:
        return None
    presented = hash_key(key)
    rows = session.execute(
        select(ApiKey, Project.name).join(Project, Project.id == ApiKey.project_id).where(ApiKey.prefix == parts[0])
    ).all()
    match = None
    for row, project_name in rows:
        # compare every candidate, so the time taken does not tell which one matched
        if hmac.compare_digest(row.key_hash, presented):
            match = (row, project_name)
    if match is None or match[0].revoked_at is not None:
        return None
    row, project_name = match
    now = utcnow()
    last = row.last_used_at
    if last is None or as_utc(last) < now - LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.commit()
    return Caller(project_id=row.project_id, project_name=project_name, key_id=row.id)


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Bearer-key authentication for every route it wraps (the /v1 router), under the failed-auth limit."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        token = bearer_token(header)
        key_hash = hash_key(token) if token else None
        limit: FailedAuthLimit = connection.app.state.auth_failures
        address = client_address(connection)
        limit.check(address, key_hash)
        try:
            if not header:
                raise NotAuthorizedException("missing Authorization header (expected 'Bearer <api key>')")
            if token is None:
                raise NotAuthorizedException("Authorization header must be 'Bearer <api key>'")
            factory: sessionmaker[Session] = connection.app.state.sessions
            caller = await anyio.to_thread.run_sync(_lookup, factory, token)
            if caller is None:
                raise NotAuthorizedException("invalid or revoked API key")
        except NotAuthorizedException:
            limit.failed(address, key_hash)
            raise
        assert key_hash is not None  # a caller was found for the token
        limit.accepted(key_hash)
        return AuthenticationResult(user=caller, auth=caller.key_id)


def _lookup(factory: sessionmaker[Session], token: str) -> Caller | None:
    with factory() as session:
        return resolve_key(session, token)


def is_operator(connection: ASGIConnection, settings: Settings) -> bool:
    """Whether the request presents the operator token (`DISTILLERY_METRICS_TOKEN`); False when it presents none
    or none is set. A wrong one is a 401 and a failed authentication."""
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    token = bearer_token(connection.headers.get("authorization"))
    if not expected or token is None:
        return False
    limit: FailedAuthLimit = connection.app.state.auth_failures
    address, key_hash = client_address(connection), hash_key(token)
    limit.check(address, key_hash)
    if hmac.compare_digest(token.encode(), expected.encode()):
        limit.accepted(key_hash)
        return True
    limit.failed(address, key_hash)
    raise NotAuthorizedException("wrong metrics token")


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for no header or another scheme."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def client_address(connection: ASGIConnection) -> str:
    """The client's address as uvicorn reports it (X-Forwarded-For from a proxy in FORWARDED_ALLOW_IPS)."""
    return connection.client.host if connection.client else "unknown"
