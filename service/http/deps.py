"""Dependencies every controller uses: the database session, the caller, the settings (and, for POSTs, the
Idempotency-Key: service.http.idempotency)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import PathParameter
from sqlalchemy.orm import Session

from service.core.db.models import ID_PATTERN  # noqa: F401  (re-exported for the controllers)
from service.core.settings import Settings
from service.http.auth import Caller


def provide_session(state: State) -> Iterator[Session]:
    """One session per request; closed (rolling back anything uncommitted) when the response is done."""
    session = state.sessions()
    try:
        yield session
    finally:
        session.close()


def provide_caller(request: Request) -> Caller:
    return request.user


def provide_settings(state: State) -> Settings:
    return state.settings


# Handler parameter types: injected by name (Litestar 3 drops inferred dependencies)
SessionDep = NamedDependency[Session]
CallerDep = NamedDependency[Caller]
SettingsDep = NamedDependency[Settings]
IdempotencyKeyDep = NamedDependency[str | None]


# an id in a path (ID_PATTERN, from service.core.db.models, also checks ids in queries)
PathId = Annotated[str, PathParameter(pattern=ID_PATTERN, max_length=80)]
