"""Following a job from the SDK: `jobs.stream_events` (SSE, resumed with Last-Event-ID where the connection breaks
or is closed early) and `jobs.wait` (states, events, failure, timeout, polling fallback, progress bar), sync and
async, against the real API process of conftest.py. Threads act as the worker by writing to the database while
the client follows; transport wrappers break or replace the real responses to inject faults."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from distillery import (
    APIConnectionError,
    AsyncDistillery,
    Distillery,
    Event,
    Job,
    JobFailedError,
    JobState,
    WaitTimeout,
)

STREAM = "/events/stream"
CONNECTION_RESET = httpx.ReadError("connection reset")  # what a cut connection raises, by default


# ----------------------------------------------------------------------------------------------- fault injection


class _Cut(httpx.SyncByteStream):
    """The body up to `limit` bytes, then a broken connection (`error`) or a clean end (`error=None`)."""

    def __init__(self, inner: httpx.SyncByteStream, limit: int, error: Exception | None) -> None:
        self.inner, self.limit, self.error = inner, limit, error

    def __iter__(self):
        sent = 0
        for chunk in self.inner:
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                if self.error is not None:
                    raise self.error
                return
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class _AsyncCut(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, limit: int, error: Exception | None) -> None:
        self.inner, self.limit, self.error = inner, limit, error

    async def __aiter__(self):
        sent = 0
        async for chunk in self.inner:
            if sent + len(chunk) >= self.limit:
                yield chunk[: self.limit - sent]
                if self.error is not None:
                    raise self.error
                return
            sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


Plan = Callable[[httpx.Request, int], "int | httpx.Response | None"]


class _Faults:
    """Records every request; for the n-th request to an `/events/stream` URL (1-based), `plan(request, n)` says
    what happens: None passes it through, a Response answers without forwarding, an int cuts the real body
    after that many bytes (with `error`, or cleanly when `error` is None)."""

    def __init__(self, plan: Plan | None = None, error: Exception | None = CONNECTION_RESET):
        self.plan, self.error = plan or (lambda request, n: None), error
        self.requests: list[httpx.Request] = []
        self.on_stream: Callable[[int], None] | None = None

    def streams(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith(STREAM)]

    def decide(self, request: httpx.Request):
        self.requests.append(request)
        if not request.url.path.endswith(STREAM):
            return None
        n = len(self.streams())
        if self.on_stream:
            self.on_stream(n)
        return self.plan(request, n)


class _Transport(httpx.BaseTransport):
    def __init__(self, faults: _Faults) -> None:
        self.faults, self.inner = faults, httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        what = self.faults.decide(request)
        if isinstance(what, httpx.Response):
            return what
        response = self.inner.handle_request(request)
        if isinstance(what, int):
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_Cut(response.stream, what, self.faults.error),
                extensions=response.extensions,
            )
        return response

    def close(self) -> None:
        self.inner.close()


class _AsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, faults: _Faults) -> None:
        self.faults, self.inner = faults, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        what = self.faults.decide(request)
        if isinstance(what, httpx.Response):
            return what
        response = await self.inner.handle_async_request(request)
        if isinstance(what, int):
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_AsyncCut(response.stream, what, self.faults.error),
                extensions=response.extensions,
            )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _headers(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key}", "Accept": "application/json"}


def faulty_client(server, faults: _Faults, **kw) -> Distillery:
    http = httpx.Client(base_url=server.url, headers=_headers(server), transport=_Transport(faults))
    return server.client(http_client=http, **kw)


def faulty_async_client(server, faults: _Faults, **kw) -> AsyncDistillery:
    http = httpx.AsyncClient(base_url=server.url, headers=_headers(server), transport=_AsyncTransport(faults))
    return AsyncDistillery(server.url, server.key, http_client=http, **{"backoff": 0.01, **kw})


class Driver:
    """Runs `fn` in a thread (the 'worker'), then `then` (finishing the job) even if `fn` failed, so that a
    client that never satisfies the worker's waits still sees the job end; `join()` re-raises what it raised."""

    def __init__(self, fn: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        self.error: BaseException | None = None

        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e
            finally:
                if then:
                    then()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the driver thread did not finish"
        if self.error:
            raise self.error


def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def ids(events: list[Event]) -> list[int]:
    return [e.id for e in events]


# ---------------------------------------------------------------------------------------------- stream_events


def test_stream_events_is_live_and_complete(server, client):
    """Events arrive while the job runs (each batch is only written once the client has the previous one)
    and the stream ends with the job, having delivered every stored event in order."""
    job_id = server.insert_job()
    received: list[Event] = []

    def worker():
        for batch in range(3):
            server.add_events(job_id, 3, kind=f"batch{batch}")
            until(lambda batch=batch: len(received) >= 1 + 3 * (batch + 1), what=f"the client to receive batch {batch}")

    driver = Driver(worker, then=lambda: server.finish(job_id))
    for event in client.jobs.stream_events(job_id):
        received.append(event)
    driver.join()

    stored = client.jobs.events(job_id)
    assert ids(received) == ids(stored)
    assert ids(received) == sorted(ids(received))
    assert [e.kind for e in received] == ["created"] + ["batch0"] * 3 + ["batch1"] * 3 + ["batch2"] * 3 + ["succeeded"]
    assert received[1].data == {"i": 0} and received[1].message == "batch0 0"


def test_stream_events_after_yields_only_later_ids(server, client):
    job_id = server.insert_job()
    server.add_events(job_id, 6)
    server.finish(job_id)
    stored = client.jobs.events(job_id)
    k = stored[3].id
    got = list(client.jobs.stream_events(job_id, after=k))
    assert ids(got) == [e.id for e in stored if e.id > k]
    assert got and all(e.id > k for e in got)


@pytest.mark.parametrize("cut_at", [700, 1500])
def test_stream_resumes_with_last_event_id_after_a_break(server, cut_at):
    """The first connection breaks mid-message (ReadError after `cut_at` bytes); the client reconnects with
    Last-Event-ID = the last id it yielded, and what it yields has no duplicate and no gap."""
    job_id = server.insert_job()
    server.add_events(job_id, 12)  # ~150 bytes each: the cut falls among them
    received: list[Event] = []
    seen_before_reconnect: list[int] = []
    faults = _Faults(lambda request, n: cut_at if n == 1 else None)

    def on_stream(n: int) -> None:
        if n == 2:
            seen_before_reconnect.extend(ids(received))

    faults.on_stream = on_stream

    def worker():
        until(lambda: len(faults.streams()) >= 2, what="the reconnection")
        server.add_events(job_id, 4, kind="after")

    driver = Driver(worker, then=lambda: server.finish(job_id))
    with faulty_client(server, faults) as c:
        for event in c.jobs.stream_events(job_id):
            received.append(event)
        driver.join()
        stored = c.jobs.events(job_id)

    streams = faults.streams()
    assert len(streams) == 2
    assert "last-event-id" not in streams[0].headers
    assert seen_before_reconnect, "the cut should fall after some events were delivered"
    assert len(seen_before_reconnect) < 13, "the cut should fall before all stored events were delivered"
    assert streams[1].headers["Last-Event-ID"] == str(seen_before_reconnect[-1])
    assert ids(received) == ids(stored)  # no duplicates, no gaps, in order
    assert len(set(ids(received))) == len(received)
    assert received[-1].kind == "succeeded"


def test_stream_resumes_from_after_through_several_breaks(server):
    """Every connection but the last breaks; with `after=` the resumption starts from the caller's cursor."""
    job_id = server.insert_job()
    server.add_events(job_id, 20)
    server.finish(job_id)
    with server.client() as c:
        stored = c.jobs.events(job_id)
    k = stored[2].id
    faults = _Faults(lambda request, n: 500 if n <= 3 else None)
    with faulty_client(server, faults, max_retries=3) as c:
        got = list(c.jobs.stream_events(job_id, after=k))
    assert ids(got) == [e.id for e in stored if e.id > k]
    headers = [r.headers.get("Last-Event-ID") for r in faults.streams()]
    assert headers[0] == str(k)
    assert len(headers) == 4
    assert [int(h) for h in headers] == sorted(int(h) for h in headers)


def test_stream_closed_cleanly_before_the_end_is_resumed(server):
    """A proxy ends the response (no error) while the job still runs: the client saw no terminal state, so
    it reconnects from its last id rather than stopping."""
    job_id = server.insert_job()
    server.add_events(job_id, 8)
    faults = _Faults(lambda request, n: 900 if n == 1 else None, error=None)
    received: list[Event] = []

    def worker():
        until(lambda: len(faults.streams()) >= 2, what="the reconnection")
        server.add_events(job_id, 2, kind="after")

    driver = Driver(worker, then=lambda: server.finish(job_id))
    with faulty_client(server, faults) as c:
        received = list(c.jobs.stream_events(job_id))
        driver.join()
        stored = c.jobs.events(job_id)
    assert ids(received) == ids(stored)
    streams = faults.streams()
    assert len(streams) == 2
    assert int(streams[1].headers["Last-Event-ID"]) in ids(stored)
    assert received[-1].kind == "succeeded"


def test_stream_that_always_breaks_gives_up(server):
    """Every connection breaks before anything arrives: APIConnectionError after max_retries reconnections."""
    job_id = server.insert_job()
    faults = _Faults(lambda request, n: 1)
    with faulty_client(server, faults, max_retries=2) as c:
        with pytest.raises(APIConnectionError, match="lost the event stream"):
            list(c.jobs.stream_events(job_id))
    assert len(faults.streams()) == 3  # the first try and 2 retries


def test_stream_that_always_breaks_after_the_snapshot_gives_up(server):
    """Every connection delivers the job's (unchanged) state snapshot, then breaks in the middle of the first
    event (~200 bytes of comment and state, then ~150 per event): no progress, so the client must still give
    up rather than reconnect forever."""
    job_id = server.insert_job()
    faults = _Faults(lambda request, n: 280 if n < 10 else 1)
    with faulty_client(server, faults, max_retries=2) as c:
        with pytest.raises(APIConnectionError):
            list(c.jobs.stream_events(job_id))
    assert len(faults.streams()) < 10, "reconnected over and over on a stream that makes no progress"


# --------------------------------------------------------------------------------------------------- wait


def test_wait_returns_the_succeeded_job_with_states_and_events(server, client):
    job_id = server.insert_job(total_steps=30)
    states: list[JobState] = []
    events: list[Event] = []

    def worker():
        for step in (10, 20, 30):
            server.set_progress(job_id, step, loss=1.0 / step)
            until(lambda step=step: any(s.progress.step == step for s in states), what=f"the client to see step {step}")
            server.add_events(job_id, 1, kind="eval")

    driver = Driver(worker, then=lambda: server.finish(job_id))
    job = client.jobs.wait(job_id, on_state=states.append, on_event=events.append)
    driver.join()

    assert isinstance(job, Job) and job.id == job_id and job.status == "succeeded"
    steps = [s.progress.step for s in states]
    assert {10, 20, 30} <= set(steps)
    assert steps == sorted(steps)
    assert all(isinstance(s, JobState) for s in states)
    assert states[-1].status == "succeeded"
    assert any(s.summary.get("loss") == pytest.approx(1 / 20) for s in states)
    assert [e.kind for e in events] == ["created", "eval", "eval", "eval", "succeeded"]
    assert ids(events) == ids(client.jobs.events(job_id))


def test_wait_on_a_finished_job_returns_at_once(server, client):
    job_id = server.insert_job()
    server.finish(job_id)
    assert client.jobs.wait(job_id).status == "succeeded"


def test_wait_raises_job_failed_with_the_error(server, client):
    job_id = server.insert_job()
    driver = Driver(
        lambda: (
            time.sleep(0.1),
            server.finish(job_id, "failed", error_code="user_error", error_message="dataset has no rows"),
        )
    )
    with pytest.raises(JobFailedError) as info:
        client.jobs.wait(job_id)
    driver.join()
    assert info.value.code == "user_error"
    assert info.value.message == "dataset has no rows"
    assert info.value.job.status == "failed" and info.value.job.id == job_id
    assert "dataset has no rows" in str(info.value)


def test_wait_raises_job_failed_when_cancelled(server, client):
    job_id = server.insert_job()
    driver = Driver(lambda: (time.sleep(0.1), server.finish(job_id, "cancelled")))
    with pytest.raises(JobFailedError) as info:
        client.jobs.wait(job_id)
    driver.join()
    assert info.value.job.status == "cancelled"


def test_wait_timeout_leaves_the_job_running(server, client):
    """A quiet running job (no events, no state change): the timeout still fires on time."""
    job_id = server.insert_job()
    start = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        client.jobs.wait(job_id, timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 3, elapsed
    assert info.value.job.status == "running"
    assert isinstance(info.value, TimeoutError)
    assert client.jobs.get(job_id).status == "running"


def test_wait_timeout_while_events_flow(server, client):
    job_id = server.insert_job()
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            server.add_events(job_id, 1)
            time.sleep(0.05)

    driver = Driver(worker)
    try:
        with pytest.raises(WaitTimeout):
            client.jobs.wait(job_id, timeout=0.3)
    finally:
        stop.set()
        driver.join()
    assert client.jobs.get(job_id).status == "running"


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(406, json={"title": "Not Acceptable", "detail": "no event streams here"}),
        httpx.Response(200, text="<html>proxy</html>", headers={"content-type": "text/html"}),
    ],
    ids=["406", "html"],
)
def test_wait_falls_back_to_polling(server, answer):
    job_id = server.insert_job()
    faults = _Faults(lambda request, n: answer)
    polls = lambda: sum(1 for r in faults.requests if r.url.path == f"/v1/jobs/{job_id}")  # noqa: E731

    def worker():
        until(lambda: faults.streams() and polls() >= 3, what="polling")
        server.set_progress(job_id, 50)
        until(lambda: polls() >= 5, what="more polling")

    states: list[JobState] = []
    driver = Driver(worker, then=lambda: server.finish(job_id))
    with faulty_client(server, faults) as c:
        job = c.jobs.wait(job_id, poll=0.05, on_state=states.append)
    driver.join()
    assert job.status == "succeeded"
    assert len(faults.streams()) == 1  # not retried: the server does not stream
    assert any(s.progress.step == 50 for s in states)
    assert states[-1].status == "succeeded"


def test_wait_polling_timeout(server):
    job_id = server.insert_job()
    faults = _Faults(lambda request, n: httpx.Response(406, json={"detail": "no"}))
    with faulty_client(server, faults) as c:
        with pytest.raises(WaitTimeout):
            c.jobs.wait(job_id, poll=0.05, timeout=0.3)
    with server.client() as c:
        assert c.jobs.get(job_id).status == "running"


def test_wait_with_progress_bar(server, client, capsys):
    job_id = server.insert_job(total_steps=10)

    def worker():
        for step in (3, 7, 10):
            server.set_progress(job_id, step, loss=0.5, tokens_per_second=1234.0, val_kl=0.25)
            time.sleep(0.06)
            server.add_events(job_id, 1, kind="eval")

    driver = Driver(worker, then=lambda: server.finish(job_id))
    job = client.jobs.wait(job_id, progress=True)
    driver.join()
    assert job.status == "succeeded"
    err = capsys.readouterr().err
    assert job_id in err
    assert "eval 0" in err  # events are printed above the bar


# -------------------------------------------------------------------------------------------------- async


def test_async_stream_events_live_and_in_order(server):
    job_id = server.insert_job()
    received: list[Event] = []

    def worker():
        for batch in range(2):
            server.add_events(job_id, 3, kind=f"batch{batch}")
            until(lambda batch=batch: len(received) >= 1 + 3 * (batch + 1), what=f"the client to receive batch {batch}")

    async def main():
        async with AsyncDistillery(server.url, server.key, backoff=0.01) as c:
            async for event in c.jobs.stream_events(job_id):
                received.append(event)
            return await c.jobs.events(job_id)

    driver = Driver(worker, then=lambda: server.finish(job_id))
    stored = asyncio.run(main())
    driver.join()
    assert ids(received) == ids(stored)
    assert [e.kind for e in received] == ["created"] + ["batch0"] * 3 + ["batch1"] * 3 + ["succeeded"]


def test_async_stream_resumes_after_a_break(server):
    job_id = server.insert_job()
    server.add_events(job_id, 12)
    faults = _Faults(lambda request, n: 800 if n == 1 else None)
    received: list[Event] = []
    seen_before_reconnect: list[int] = []
    faults.on_stream = lambda n: seen_before_reconnect.extend(ids(received)) if n == 2 else None

    def worker():
        until(lambda: len(faults.streams()) >= 2, what="the reconnection")
        server.add_events(job_id, 3, kind="after")

    async def main():
        async with faulty_async_client(server, faults) as c:
            async for event in c.jobs.stream_events(job_id):
                received.append(event)
            return await c.jobs.events(job_id)

    driver = Driver(worker, then=lambda: server.finish(job_id))
    stored = asyncio.run(main())
    driver.join()
    streams = faults.streams()
    assert len(streams) == 2
    assert seen_before_reconnect
    assert streams[1].headers["Last-Event-ID"] == str(seen_before_reconnect[-1])
    assert ids(received) == ids(stored)


def test_async_stream_after_and_giving_up(server):
    job_id = server.insert_job()
    server.add_events(job_id, 4)

    async def main():
        faults = _Faults(lambda request, n: 1)
        async with faulty_async_client(server, faults, max_retries=1) as c:
            with pytest.raises(APIConnectionError):
                async for _ in c.jobs.stream_events(job_id):
                    pass
        assert len(faults.streams()) == 2
        server.finish(job_id)
        async with AsyncDistillery(server.url, server.key, backoff=0.01) as c:
            stored = await c.jobs.events(job_id)
            k = stored[1].id
            got = [e async for e in c.jobs.stream_events(job_id, after=k)]
        assert ids(got) == [e.id for e in stored if e.id > k]

    asyncio.run(main())


def test_async_wait_success_states_and_events(server):
    job_id = server.insert_job(total_steps=20)
    states: list[JobState] = []
    events: list[Event] = []

    def worker():
        for step in (5, 15):
            server.set_progress(job_id, step)
            until(lambda step=step: any(s.progress.step == step for s in states), what=f"the client to see step {step}")
        server.add_events(job_id, 2, kind="eval")

    async def main():
        async with AsyncDistillery(server.url, server.key, backoff=0.01) as c:
            return await c.jobs.wait(job_id, on_state=states.append, on_event=events.append)

    driver = Driver(worker, then=lambda: server.finish(job_id))
    job = asyncio.run(main())
    driver.join()
    assert job.status == "succeeded" and job.id == job_id
    steps = [s.progress.step for s in states]
    assert {5, 15} <= set(steps) and steps == sorted(steps)
    assert [e.kind for e in events] == ["created", "eval", "eval", "succeeded"]


def test_async_wait_failed_cancelled_and_timeout(server):
    failed, cancelled, running = server.insert_job(), server.insert_job(), server.insert_job()

    def worker():
        time.sleep(0.1)
        server.finish(failed, "failed", error_code="user_error", error_message="bad spec")
        server.finish(cancelled, "cancelled")

    async def main():
        async with AsyncDistillery(server.url, server.key, backoff=0.01) as c:
            with pytest.raises(JobFailedError) as info:
                await c.jobs.wait(failed)
            assert info.value.code == "user_error" and info.value.message == "bad spec"
            with pytest.raises(JobFailedError) as info:
                await c.jobs.wait(cancelled)
            assert info.value.job.status == "cancelled"
            start = time.monotonic()
            with pytest.raises(WaitTimeout):
                await c.jobs.wait(running, timeout=0.3)
            assert time.monotonic() - start < 3
            assert (await c.jobs.get(running)).status == "running"

    driver = Driver(worker)
    asyncio.run(main())
    driver.join()


def test_async_wait_falls_back_to_polling(server):
    job_id = server.insert_job()
    faults = _Faults(lambda request, n: httpx.Response(406, json={"detail": "no event streams"}))
    polls = lambda: sum(1 for r in faults.requests if r.url.path == f"/v1/jobs/{job_id}")  # noqa: E731

    def worker():
        until(lambda: polls() >= 3, what="polling")

    async def main():
        async with faulty_async_client(server, faults) as c:
            return await c.jobs.wait(job_id, poll=0.05)

    driver = Driver(worker, then=lambda: server.finish(job_id))
    job = asyncio.run(main())
    driver.join()
    assert job.status == "succeeded"
    assert len(faults.streams()) == 1
