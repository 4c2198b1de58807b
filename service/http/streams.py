"""Server-sent event streams: one poller per API process serves every open stream.

A stream must never hold a database connection or transaction while it waits: with one session per stream, a
burst of streams took every pooled connection ("idle in transaction") and the event loop blocked waiting for
one, for good. Here each poll is one short transaction in a worker thread, for all streamed jobs at once; its
rows are turned into plain messages before the session closes, and each stream waits on an asyncio event.
The database sees one job-state query per poll plus one event query per distinct (job, cursor), whatever the
number of streams, and a stream costs the process a few objects, not a thread or a connection.

Streams are bounded per API key and per process; past either bound `open` raises TooMany (a 429 with
Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio.to_thread
from litestar.response import ServerSentEventMessage
from sqlalchemy.orm import Session, sessionmaker

from service.core.errors import TooMany
from service.core.lifecycle import TERMINAL
from service.domain import jobs as service
from service.http.schemas import event_out, to_json

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
RECONNECT_MS = 2000
EVENTS_PER_POLL = 500  # events one stream gets per poll; a stream catching up is polled again at once
RETRY_AFTER_SECONDS = 5


@dataclass
class _Batch:
    """What one poll found for one job: its state, and events after one cursor (as ready-made messages)."""

    state: dict | None
    events: dict[int, list[tuple[int, ServerSentEventMessage]]]  # cursor -> [(event id, message)]


@dataclass(eq=False)
class _Stream:
    job_id: str
    key_id: str
    after: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


class EventHub:
    """Open streams of this process and the one task that polls the database for them."""

    def __init__(self, factory: sessionmaker[Session], poll_seconds: float, per_key: int, total: int) -> None:
        self.factory = factory
        self.poll_seconds = poll_seconds
        self.per_key = per_key
        self.total = total
        self._streams: set[_Stream] = set()
        self._per_key: dict[str, int] = defaultdict(int)
        self._latest: dict[str, _Batch] = {}
        self._poller: asyncio.Task | None = None
        self._poll_now: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing_since: float | None = None

    def open(self, key_id: str, job_id: str, after: int) -> AsyncIterator[ServerSentEventMessage]:
        """The messages of one stream (raises TooMany when a bound is reached)."""
        if len(self._streams) >= self.total:
            raise self._too_many(f"this server already serves {self.total} event streams")
        if self._per_key[key_id] >= self.per_key:
            raise self._too_many(
                f"this API key already has {self.per_key} open event streams; close one "
                "(or poll GET /v1/jobs/{id}/events) and retry"
            )
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (the server restarted its loop, or a test client)
            self._loop, self._poller = loop, None
            self._streams.clear()
            self._per_key.clear()
        stream = _Stream(job_id=job_id, key_id=key_id, after=after)
        self._streams.add(stream)
        self._per_key[key_id] += 1
        if self._poller is None or self._poller.done():
            self._poll_now = asyncio.Event()
            self._poller = loop.create_task(self._poll_forever(), name="sse-poller")
        else:
            self._poller_wake()
        return self._messages(stream)

    @staticmethod
    def _too_many(detail: str) -> TooMany:
        return TooMany(detail, RETRY_AFTER_SECONDS, code="too-many-streams", title="Too many event streams")

    def _close(self, stream: _Stream) -> None:
        if stream.closed:
            return
        stream.closed = True
        self._streams.discard(stream)
        self._per_key[stream.key_id] -= 1
        if self._per_key[stream.key_id] <= 0:
            del self._per_key[stream.key_id]

    # ----------------------------------------------------------------------------------------- one stream

    async def _messages(self, stream: _Stream) -> AsyncIterator[ServerSentEventMessage]:
        """Stored events carry their id (resumable). Between them, a `state` message without an id reports the
        job's status, progress and latest metrics whenever they change: a snapshot, so it needs no replay.
        Ends once the job is terminal and everything up to that was sent."""
        try:
            # an opening comment gets the headers through buffering proxies; `retry` paces client reconnects
            yield ServerSentEventMessage(comment="events of " + stream.job_id, data=None, retry=RECONNECT_MS)
            last_state: dict | None = None
            quiet_since = time.monotonic()
            seen: _Batch | None = None
            while True:
                try:
                    await asyncio.wait_for(stream.wake.wait(), timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keep-alive", data=None)
                    quiet_since = time.monotonic()
                    continue
                stream.wake.clear()
                batch = self._latest.get(stream.job_id)
                if batch is None or batch is seen:
                    continue
                seen = batch
                if batch.state is not None and batch.state != last_state:
                    last_state = batch.state
                    yield ServerSentEventMessage(event="state", data=json.dumps(batch.state, default=str))
                    quiet_since = time.monotonic()
                events = batch.events.get(stream.after)
                if events is None:  # polled before this stream moved its cursor: ask for its page
                    seen = None
                    self._poller_wake()
                    continue
                for event_id, message in events:
                    stream.after = event_id
                    yield message
                if events:
                    quiet_since = time.monotonic()
                    continue  # the poller fetches the next page for the new cursor
                if batch.state is None or batch.state["status"] in TERMINAL:
                    return
                if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                    yield ServerSentEventMessage(comment="keep-alive", data=None)
                    quiet_since = time.monotonic()
        finally:
            self._close(stream)

    # ----------------------------------------------------------------------------------------- the poller

    def _poller_wake(self) -> None:
        if self._poll_now is not None:
            self._poll_now.set()

    async def _poll_forever(self) -> None:
        assert self._poll_now is not None
        while self._streams:
            self._poll_now.clear()
            wanted = {(s.job_id, s.after) for s in self._streams}
            try:
                found = await anyio.to_thread.run_sync(self._poll, wanted)
            except Exception as e:  # the database is down or restarting: keep the streams, say it once
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("event streams: cannot read events (%s); retrying", e.__class__.__name__)
                found = None
            else:
                if self._failing_since is not None:
                    log.warning(
                        "event streams: reading events again after %.0f s", time.monotonic() - self._failing_since
                    )
                    self._failing_since = None
            full = False
            if found is not None:
                self._latest = found
                full = any(len(page) >= EVENTS_PER_POLL for b in found.values() for page in b.events.values())
                for stream in self._streams:
                    stream.wake.set()
            if full:
                await asyncio.sleep(0)  # let the streams send this page, then fetch the next at once
                continue
            try:
                await asyncio.wait_for(self._poll_now.wait(), timeout=self.poll_seconds)
            except TimeoutError:
                pass
        self._latest = {}

    def _poll(self, wanted: set[tuple[str, int]]) -> dict[str, _Batch]:
        """One short transaction: the states of the streamed jobs and their events after each cursor."""
        with self.factory() as session:
            states = service.job_states(session, {job_id for job_id, _ in wanted})
            batches = {job_id: _Batch(state=state, events={}) for job_id, state in states.items()}
            for job_id, after in wanted:
                rows = service.events_after(session, job_id, after, EVENTS_PER_POLL)
                batches.setdefault(job_id, _Batch(state=None, events={})).events[after] = [
                    (
                        row.id,
                        ServerSentEventMessage(
                            id=str(row.id), event=row.kind, data=json.dumps(to_json(event_out(row)))
                        ),
                    )
                    for row in rows
                ]
        return batches
