"""The asynchronous twin of `Distillery`: the same calls (`_calls`), awaited. Iterators are async."""

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
from ._exceptions import APIConnectionError, APIError, JobFailedError, WaitTimeout, error_for
from ._progress import JobProgress
from ._sse import Message, SSEDecoder
from ._jobfile import job_body
from .types import TERMINAL, Artifact, Checkpoint, Dataset, Event, Job, JobState, MetricPoint, Model


class AsyncDistillery(BaseClient):
    """`async with AsyncDistillery() as client: job = await client.jobs.create("job.yaml")`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http_client: httpx.AsyncClient | None = None, **kw: Any) -> None:
        super().__init__(base_url, api_key, **kw)
        self._http = http_client or httpx.AsyncClient(base_url=self.base_url, headers=self._default_headers(),
                                                      timeout=self.timeout)
        self.datasets = AsyncDatasets(self)
        self.models = AsyncModels(self)
        self.jobs = AsyncJobs(self)
        self.artifacts = AsyncArtifacts(self)

    async def send(self, call: Call, *, stream: bool = False,
                   read_timeout: float | None = None) -> httpx.Response:
        attempt = 0
        while True:
            response = None
            for f in (call.files or {}).values():
                if isinstance(f, tuple) and hasattr(f[1], "seek"):
                    f[1].seek(0)
            try:
                request = self._http.build_request(call.method, call.path, params=call.params, json=call.json,
                                                   data=call.data, files=call.files, headers=call.headers,
                                                   timeout=self._timeout_for(stream, read_timeout))
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if not self._should_retry(attempt, None):
                    raise APIConnectionError(f"{call.method} {self.base_url}{call.path}: {e or type(e).__name__}") from e
            else:
                if response.status_code < 400:
                    return response
                if not self._should_retry(attempt, response):
                    await response.aread()
                    raise error_for(response)
                await response.aclose()
            await anyio.sleep(self._delay(attempt, response))
            attempt += 1

    async def call(self, call: Call) -> Any:
        return call.result(await self.send(call))

    async def pages(self, make: Callable[[Any], Call], after: Any = None) -> AsyncIterator[Any]:
        while True:
            items, has_more = await self.call(make(after))
            for item in items:
                yield item
            if not has_more or not items:
                return
            after = items[-1].id

    @asynccontextmanager
    async def stream(self, call: Call, read_timeout: float | None = None) -> AsyncIterator[httpx.Response]:
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
        path = Path(path)
        with path.open("rb") as fh:
            return await self._client.call(calls.upload_dataset(fh, path.name, name, format))

    def list(self, *, limit: int | None = None) -> AsyncIterator[Dataset]:
        return self._client.pages(lambda after: calls.list_datasets(limit, after))

    async def get(self, id: str) -> Dataset:
        return await self._client.call(calls.get_dataset(id))

    async def delete(self, id: str) -> None:
        await self._client.call(calls.delete_dataset(id))


class AsyncModels(_Resource):
    async def add(self, path: str | Path, *, name: str | None = None) -> Model:
        return await self._client.call(calls.register_model(path, name))

    async def upload(self, path: str | Path, *, name: str | None = None) -> Model:
        path = Path(path)
        with path.open("rb") as fh:
            return await self._client.call(calls.upload_model(fh, path.name, name))

    def list(self, *, limit: int | None = None) -> AsyncIterator[Model]:
        return self._client.pages(lambda after: calls.list_models(limit, after))

    async def get(self, id: str) -> Model:
        return await self._client.call(calls.get_model(id))


class AsyncJobs(_Resource):
    async def create(self, spec: Any, *, parent_id: str | None = None, idempotency_key: str | None = None) -> Job:
        return await self._client.call(calls.create_job(job_body(spec, parent_id), idempotency_key))

    def list(self, *, status: str | None = None, kind: str | None = None, parent_id: str | None = None,
             limit: int | None = None) -> AsyncIterator[Job]:
        return self._client.pages(lambda after: calls.list_jobs(status, kind, limit, after, parent_id))

    async def get(self, id: str) -> Job:
        return await self._client.call(calls.get_job(id))

    async def cancel(self, id: str) -> Job:
        return await self._client.call(calls.cancel_job(id))

    async def events(self, id: str, *, after: int | None = None) -> list[Event]:
        return [e async for e in self._client.pages(lambda cursor: calls.list_events(id, cursor), after)]

    async def metrics(self, id: str, *, name: str | None = None) -> list[MetricPoint]:
        return await self._client.call(calls.list_metrics(id, name))

    async def checkpoints(self, id: str) -> list[Checkpoint]:
        return await self._client.call(calls.list_checkpoints(id))

    async def artifacts(self, id: str) -> list[Artifact]:
        return await self._client.call(calls.list_artifacts(id))

    async def stream_events(self, id: str, *, after: int | None = None) -> AsyncIterator[Event]:
        async for message in self._follow(id, after):
            if message.id is not None:
                yield Event.model_validate(message.data)

    async def _follow(self, id: str, after: int | None, deadline: float | None = None) -> AsyncIterator[Message]:
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
                            failures = 0   # progress (the same snapshot on each reconnection is none)
                        if message.id is not None:
                            after = message.id
                        if message.event == "state":
                            snapshot, status = message.data, message.data.get("status")
                        yield message
                if status in TERMINAL:
                    return
            except httpx.TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    return   # the caller's time is up, not the stream's fault
            failures += 1
            if failures > client.max_retries:
                raise APIConnectionError(f"lost the event stream of job {id} {failures} times")
            await anyio.sleep(client._delay(failures - 1, None))

    async def wait(self, id: str, *, timeout: float | None = None, progress: bool = False, poll: float = 2.0,
                   on_state: Callable[[JobState], None] | None = None,
                   on_event: Callable[[Event], None] | None = None) -> Job:
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
                    while True:
                        job = await self.get(id)
                        state(JobState(status=job.status, progress=job.progress, summary=job.summary))
                        if job.done:
                            break
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(job, timeout) from None
                        await anyio.sleep(poll)
            job = await self.get(id)
            state(JobState(status=job.status, progress=job.progress, summary=job.summary))
        if not job.done:
            raise WaitTimeout(job, timeout)   # the stream stopped at the deadline
        if job.status != "succeeded":
            raise JobFailedError(job)
        warn_about(job)
        return job


class AsyncArtifacts(_Resource):
    async def list(self, job_id: str) -> list[Artifact]:
        return await self._client.call(calls.list_artifacts(job_id))

    async def get(self, id: str) -> Artifact:
        return await self._client.call(calls.get_artifact(id))

    async def download(self, job_id: str, dest: str | Path, *,
                       names: Callable[[str], bool] | None = None) -> list[Path]:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        return [await self.download_file(a, artifact_target(dest, a)) for a in await self.list(job_id)
                if names is None or names(a.name)]

    async def download_file(self, artifact: Artifact, target: str | Path) -> Path:
        part = PartialFile(Path(target), artifact)
        if part.already_done():
            return part.target
        attempt = 0
        while True:
            try:
                async with self._client.stream(calls.artifact_content(artifact.id, part.request_headers())) as response:
                    with part.begin(response) as fh:
                        async for chunk in response.aiter_bytes():
                            part.write(fh, chunk)
                    return part.finish(response)
            except httpx.TransportError as e:
                if attempt >= self._client.max_retries:
                    raise APIConnectionError(f"download of {artifact.name} failed: {e}") from e
            await anyio.sleep(self._client._delay(attempt, None))
            attempt += 1
