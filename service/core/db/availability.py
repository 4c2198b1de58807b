"""Whether the database can serve right now, and one log line per outage.

While PostgreSQL restarts (or SQLite stays locked past its busy timeout), every request that touches the
database fails the same way. Such a failure is not a bug of the request: the API answers it 503 with
`Retry-After` (service.http.problems), and `Availability` logs the outage twice, a warning when the first request
fails and one when statements succeed again, instead of a traceback per request. "Again" means with no failure
for `SETTLE_SECONDS`: in a partial outage (a pool exhausted, a lock held) some statements succeed between the
failures, and the outage is still one outage, not a warning per request.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from functools import lru_cache

import psycopg
from sqlalchemy import event
from sqlalchemy import exc as sa

from service.core.db.session import engine_for

log = logging.getLogger(__name__)

SETTLE_SECONDS = 1.0  # an outage is over at the first success this long after the last failure

# The exception types that may mean "unavailable"; `unavailable()` decides for each error.
UNAVAILABLE_TYPES = (
    sa.OperationalError,
    sa.InterfaceError,
    sa.DisconnectionError,
    sa.TimeoutError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

# sqlite3 raises OperationalError for mistakes too ("no such table"): only these mean "try again later"
_SQLITE_UNAVAILABLE = (
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "disk i/o error",
)


def unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database could not be reached or could not serve now (connection refused or
    lost, server shutting down, pool exhausted, statement cancelled, SQLite locked), not that the request or
    the code is wrong."""
    if not isinstance(exc, UNAVAILABLE_TYPES):
        return False
    cause = getattr(exc, "orig", None)
    if isinstance(cause, sqlite3.Error):  # SQLite: only a locked or unreadable file is worth a retry
        return isinstance(cause, sqlite3.OperationalError) and str(cause).lower().startswith(_SQLITE_UNAVAILABLE)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


class Availability:
    """The database's state as this process last saw it: `failed` on each refused request, `answered` after
    each successful statement. Only the changes are logged. Thread-safe: requests run in worker threads."""

    def __init__(self, settle_seconds: float = SETTLE_SECONDS) -> None:
        self.settle_seconds = settle_seconds
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.last_failure = 0.0
        self.refused = 0

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.refused += 1
            self.last_failure = time.monotonic()
            if self.down_since is not None:
                return
            self.down_since = self.last_failure
        log.warning("database unavailable, answering 503 until it is back: %s", _first_line(exc))

    def answered(self) -> None:
        if self.down_since is None:  # the common case, without the lock
            return
        with self._lock:
            now = time.monotonic()
            if self.down_since is None or now - self.last_failure < self.settle_seconds:
                return
            seconds, refused = now - self.down_since, self.refused
            self.down_since, self.refused = None, 0
        log.warning("database available again after %.1f s (%d requests refused meanwhile)", seconds, refused)


@lru_cache
def availability_for(url: str) -> Availability:
    """The one `Availability` of the database at `url`, told by its engine of every statement that succeeds."""
    availability = Availability()
    event.listen(engine_for(url), "after_cursor_execute", lambda *_: availability.answered())
    return availability
