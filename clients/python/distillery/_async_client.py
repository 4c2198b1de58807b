# The one hand-written client: `_client.py` (the synchronous `Distillery`) is generated from this file by
# `python clients/python/tools/unasync.py`, which rewrites tokens (`async def` -> `def`, `await x` -> `x`,
# `AsyncDistillery` -> `Distillery`, `anyio.sleep` -> `time.sleep`, ...; the rules are listed there) and stops on
# anything async it has no rule for. Edit here, regenerate, commit both; tests/clients/test_sync_twin.py fails
# while they disagree. Write what reads right in both twins (docstrings are rewritten too), and break long lines
# right after an opening bracket: the rewrite shortens lines, so a continuation aligned to a bracket would drift.
"""The asynchronous client: `AsyncDistillery()`, with resources `datasets`, `models`, `jobs`, `artifacts`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from . import _calls as calls
from ._base import BaseClient, Call, PartialFile, artifact_target, warn_about
from ._exceptions import APIConnectionError, APIError, DistilleryError, JobFailedError, WaitTimeout, error_for
from ._jobfile import job_body
from ._progress import JobProgress
from ._sse import Message, SSEDecoder
from .types import TERMINAL, Artifact, Checkpoint, Dataset, Event, Job, JobState, MetricPoint, Model


class AsyncDistillery(BaseClient):
    """`AsyncDistillery(base_url=None, api_key=None, *, profile=None, timeout=None, max_retries=None)`; unset
    settings come from `DISTILLERY_*` variables, then the config file.

        async with AsyncDistillery() as client:
            job = await client.jobs.create("job.yaml")
    """

    # Every backoff wait goes through this hook, so a test can record the delays instead of sleeping.
    _sleep = staticmethod(anyio.sleep)

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kw)
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, headers=self._default_headers(), timeout=self.timeout
        )
        self.datasets = AsyncDatasets(self)
        self.models = AsyncModels(self)
        self.jobs = AsyncJobs(self)
        self.artifacts = AsyncArtifacts(self)

    # -- transport
    async def send(self, call: Call, *, stream: bool = False, read_timeout: float | None = None) -> httpx.Response:
        """Send with retries; a response below 400, else the typed error. Streamed responses must be closed."""
        attempt = 0
        while True:
            response = None
            for f in (call.files or {}).values():  # a retried upload starts its file again
                if isinstance(f, tuple) and hasattr(f[1], "seek"):
                    f[1].seek(0)
            try:
                request = self._http.build_request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    data=call.data,
                    files=call.files,
                    headers=call.headers,
                    timeout=self._timeout_for(stream, read_timeout),
                )
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if not self._should_retry(attempt, None):
                    raise APIConnectionError(
                        f"{call.method} {self.base_url}{call.path}: {e or type(e).__name__}"
                    ) from e
            else:
                if response.status_code < 400:
                    return response
                if not self._should_retry(attempt, response):
                    await response.aread()  # the error's detail is in the body
                    raise error_for(response)
                await response.aclose()
            await self._sleep(self._delay(attempt, response))
            attempt += 1

    async def call(self, call: Call) -> Any:
        """Send `call` and return its parsed answer."""
        return call.result(await self.send(call))

    async def pages(self, make: Callable[[Any], Call], after: Any = None) -> AsyncIterator[Any]:
        """Every item across pages: `make(after)` builds the call for the page after a cursor."""
        while True:
            items, has_more = await self.call(make(after))
            for item in items:
                yield item
            if not has_more or not items:
                return
            after = items[-1].id

    @asynccontextmanager
    async def stream(self, call: Call, read_timeout: float | None = None) -> AsyncIterator[httpx.Response]:
        """The response with its body unread, closed when the block ends."""
        response = await self.send(call, stream=True, read_timeout=read_timeout)
        try:
            yield response
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDistillery:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _Resource:
    def __init__(self, client: AsyncDistillery) -> None:
        self._client = client


class AsyncDatasets(_Resource):
    async def upload(self, path: str | Path, *, name: str | None = None, format: str | None = None) -> Dataset:
        """Upload a JSONL file (formats: text, completions, chat, preference, mcq, prompts; detected unless given)."""
        path = Path(path)
        with path.open("rb") as fh:
            return await self._client.call(calls.upload_dataset(fh, path.name, name, format))

    def list(self, *, limit: int | None = None) -> AsyncIterator[Dataset]:
        """Every dataset, newest first, fetched `limit` per page."""
        return self._client.pages(lambda after: calls.list_datasets(limit, after))

    async def get(self, id: str) -> Dataset:
        return await self._client.call(calls.get_dataset(id))

    async def delete(self, id: str) -> None:
        await self._client.call(calls.delete_dataset(id))


class AsyncModels(_Resource):
    async def add(self, path: str | Path, *, name: str | None = None) -> Model:
        """Register a model folder or GGUF file that is on the server's disk."""
        return await self._client.call(calls.register_model(path, name))

    async def upload(self, path: str | Path, *, name: str | None = None) -> Model:
        """Upload a local GGUF file; the server imports it."""
        path = Path(path)
        with path.open("rb") as fh:
            return await self._client.call(calls.upload_model(fh, path.name, name))

    def list(self, *, limit: int | None = None) -> AsyncIterator[Model]:
        return self._client.pages(lambda after: calls.list_models(limit, after))

    async def get(self, id: str) -> Model:
        return await self._client.call(calls.get_model(id))


class AsyncJobs(_Resource):
    async def create(self, spec: Any, *, parent_id: str | None = None, idempotency_key: str | None = None) -> Job:
        """Submit a job from a typed spec (`DistillSpec`...), a `{kind, spec}` dict, or a YAML/JSON file."""
        return await self._client.call(calls.create_job(job_body(spec, parent_id), idempotency_key))

    def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        parent_id: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Job]:
        """Every job, newest first; `parent_id` lists a job's children (e.g. its evaluation)."""
        return self._client.pages(lambda after: calls.list_jobs(status, kind, limit, after, parent_id))

    async def get(self, id: str) -> Job:
        return await self._client.call(calls.get_job(id))

    async def cancel(self, id: str) -> Job:
        return await self._client.call(calls.cancel_job(id))

    async def events(self, id: str, *, after: int | None = None) -> list[Event]:
        """The job's stored events so far, oldest first."""
        return [e async for e in self._client.pages(lambda cursor: calls.list_events(id, cursor), after)]

    async def metrics(self, id: str, *, name: str | None = None) -> list[MetricPoint]:
        return await self._client.call(calls.list_metrics(id, name))

    async def checkpoints(self, id: str) -> list[Checkpoint]:
        return await self._client.call(calls.list_checkpoints(id))

    async def artifacts(self, id: str) -> list[Artifact]:
        return await self._client.call(calls.list_artifacts(id))

    async def stream_events(self, id: str, *, after: int | None = None) -> AsyncIterator[Event]:
        """The job's events as they happen, until it ends. A dropped connection is resumed where it broke."""
        async for message in self._follow(id, after):
            if message.id is not None:
                yield Event.model_validate(message.data)

    async def _follow(self, id: str, after: int | None, deadline: float | None = None) -> AsyncIterator[Message]:
        """Every SSE message; reconnects with Last-Event-ID until a terminal state has been seen and the server
        closed the stream. With a `deadline` (monotonic time) it stops quietly when that passes."""
        client, failures, status, snapshot = self._client, 0, None, None
        while True:
            read_timeout = None
            if deadline is not None:
                if time.monotonic() >= deadline:
                    return
                read_timeout = max(0.05, deadline - time.monotonic())
            try:
                async with client.stream(calls.stream_events(id, after), read_timeout) as response:
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        raise APIConnectionError(f"{response.url} did not answer with an event stream")
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        message = decoder.feed(line)
                        if message is None:
                            continue
                        if message.event != "state" or message.data != snapshot:
                            failures = 0  # progress (the same snapshot on each reconnection is none)
                        if message.id is not None:
                            after = message.id
                        if message.event == "state":
                            snapshot, status = message.data, message.data.get("status")
                        yield message
                if status in TERMINAL:
                    return
            except httpx.TransportError:  # the connection broke mid-stream
                if deadline is not None and time.monotonic() >= deadline:
                    return  # the caller's time is up, not the stream's fault
            failures += 1  # broke, or closed before the job ended (a proxy's timeout): resume
            if failures > client.max_retries:
                raise APIConnectionError(f"lost the event stream of job {id} {failures} times")
            await client._sleep(client._delay(failures - 1, None))

    async def wait(
        self,
        id: str,
        *,
        timeout: float | None = None,
        progress: bool = False,
        poll: float = 2.0,
        on_state: Callable[[JobState], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Job:
        """Follow the job to its end (over SSE, or by polling where streaming fails) and return it; raise
        `JobFailedError` if it failed or was cancelled, `WaitTimeout` after `timeout` seconds. The callbacks
        are plain functions, called as states and events arrive."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.get(id)
        with JobProgress(job.id, job.kind, enabled=progress) as bar:

            def state(s: JobState) -> None:
                bar.update(s)
                if on_state:
                    on_state(s)

            if not job.done:
                try:
                    async for message in self._follow(id, None, deadline):
                        if message.event == "state":
                            state(JobState.model_validate(message.data))
                        elif message.id is not None:
                            event = Event.model_validate(message.data)
                            bar.event(event)
                            if on_event:
                                on_event(event)
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(await self.get(id), timeout)
                except (APIConnectionError, APIError) as e:
                    if isinstance(e, APIError) and e.status in (401, 403, 404):
                        raise
                    while True:  # no event stream here: poll instead
                        job = await self.get(id)
                        state(JobState.of(job))
                        if job.done:
                            break
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(job, timeout) from None
                        # the poll interval is a real wait, not a backoff: it stays outside the `_sleep` hook
                        await anyio.sleep(poll)
            job = await self.get(id)
            state(JobState.of(job))
        if not job.done:
            raise WaitTimeout(job, timeout)  # the stream stopped at the deadline
        if job.status != "succeeded":
            raise JobFailedError(job)
        warn_about(job)
        return job


class AsyncArtifacts(_Resource):
    async def list(self, job_id: str) -> list[Artifact]:
        return await self._client.call(calls.list_artifacts(job_id))

    async def get(self, id: str) -> Artifact:
        return await self._client.call(calls.get_artifact(id))

    async def read(self, id: str) -> bytes:
        """One artifact's whole content, in memory (for small files such as `report.json`)."""
        response = await self._client.send(calls.artifact_content(id, {}))
        return response.content

    async def download(
        self,
        job_id: str,
        dest: str | Path,
        *,
        names: Callable[[str], bool] | None = None,
    ) -> list[Path]:
        """Write the job's artifacts under `dest` (keeping folders such as `student/`), each checked against
        its sha256. An interrupted download resumes from its `.part` file with an HTTP Range request."""
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise DistilleryError(f"{dest} is a file, not a folder: name a folder to download into")
        wanted = [a for a in await self.list(job_id) if names is None or names(a.name)]  # 404 before any mkdir
        if wanted:
            dest.mkdir(parents=True, exist_ok=True)
        return [await self.download_file(a, artifact_target(dest, a)) for a in wanted]

    async def download_file(self, artifact: Artifact, target: str | Path) -> Path:
        """One artifact to `target`, resumed from `<target>.part` if one is there; nothing fetched if `target`
        already holds it."""
        part = PartialFile(Path(target), artifact)
        if part.already_done():
            return part.target
        attempt = 0
        while True:
            try:
                call = calls.artifact_content(artifact.id, part.request_headers())  # Range: from what we have
                async with self._client.stream(call) as response:
                    with part.begin(response) as fh:
                        async for chunk in response.aiter_bytes():
                            part.write(fh, chunk)
                    return part.finish(response)
            except httpx.TransportError as e:  # broke mid-body: go on from what arrived
                if attempt >= self._client.max_retries:
                    raise APIConnectionError(f"download of {artifact.name} failed: {e}") from e
            await self._client._sleep(self._client._delay(attempt, None))
            attempt += 1
