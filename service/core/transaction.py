"""One transaction per request: the domain services write and flush, whoever called them commits once.

A service never commits. What it writes is committed by its caller, together with anything else the caller adds
(at the HTTP edge, the Idempotency-Key record of the response, in the same transaction: service.http.idempotency).
What must happen only once the rows are committed (ring the broker, delete a folder) the service registers with
`after_commit`; what must be undone when they are not (a file already moved into place) with `undo`. `commit`
runs the one or the other; `abandon` rolls back and undoes.

The actions are kept in `session.info`, so a session used without `commit`/`abandon` keeps them: commit with
`transaction.commit(session)`, not `session.commit()`, after calling a service.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.orm import Session

_AFTER = "distillery.after_commit"
_UNDO = "distillery.undo"


def after_commit(session: Session, action: Callable[[], object]) -> None:
    """Run `action` once the current transaction is committed (never if it is not)."""
    session.info.setdefault(_AFTER, []).append(action)


def undo(session: Session, action: Callable[[], object]) -> None:
    """Run `action` if the current transaction is abandoned or its commit fails (never once it is committed)."""
    session.info.setdefault(_UNDO, []).append(action)


def commit(session: Session) -> None:
    """Commit, then run the after-commit actions in order. A failed commit is abandoned and re-raised."""
    try:
        session.commit()
    except BaseException:
        abandon(session)
        raise
    session.info.pop(_UNDO, None)
    for action in session.info.pop(_AFTER, []):
        action()


def abandon(session: Session) -> None:
    """Roll back and run the undo actions, last registered first. Safe to call more than once."""
    session.info.pop(_AFTER, None)
    try:
        session.rollback()
    finally:
        for action in reversed(session.info.pop(_UNDO, [])):
            action()
