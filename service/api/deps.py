"""Dependencies every controller uses: the database session, the caller, the settings."""

from __future__ import annotations

from collections.abc import Iterator

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from sqlalchemy.orm import Session

from service.api.auth import Caller
from service.settings import Settings


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
