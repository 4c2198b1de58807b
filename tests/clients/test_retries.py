"""Retries, backoff and idempotency, through a real HTTP proxy (a socket server in front of the real API) that
misbehaves on cue: drops or fails answers, asks to slow down, or stalls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from distillery import (
    APIConnectionError,
    AsyncDistillery,
    BadRequestError,
    Distillery,
    RateLimitError,
    ServerError,
    _base,
)
from tests.helpers.services import free_port

# A fault: given (method, path, attempt number of that method+path), return None to forward normally, or
# ("after", status, headers) to forward and then answer `status` instead, or ("instead", status, headers) to
# answer without forwarding, or ("stall", seconds) to wait before forwarding.
Fault = Callable[[str, str, int], tuple | None]


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=30)
        self.fault: Fault = lambda *a: None
        self.seen: list[tuple[str, str, dict]] = []
        self.counts: dict[tuple[str, str], int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                key = (self.command, path)
                proxy.counts[key] = attempt = proxy.counts.get(key, 0) + 1
                proxy.seen.append((self.command, path, dict(self.headers)))
                fault = proxy.fault(self.command, path, attempt)
                if fault and fault[0] == "stall":
                    time.sleep(fault[1])
                    fault = None
                if fault and fault[0] == "instead":
                    return self._answer(fault[1], b'{"status": %d, "detail": "injected"}' % fault[1], fault[2])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = proxy.upstream.request(self.command, self.path, content=body, headers=headers)
                if fault and fault[0] == "after":
                    return self._answer(
                        fault[1], b'{"status": %d, "detail": "injected after forwarding"}' % fault[1], fault[2]
                    )
                self._answer(r.status_code, r.content, {"Content-Type": r.headers.get("content-type", "")})

            def _answer(self, status, content, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that gave up on a stall: expected
                pass

        self.server = Server(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[dict]:
        return [h for m, p, h in self.seen if m == "POST" and p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()


@pytest.fixture
def proxy(server):
    p = FlakyProxy(server.url)
    yield p
    p.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff sleeps instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(Distillery, "_sleep", staticmethod(recorded.append))
    return recorded


@pytest.fixture(scope="module")
def body(server, tiny_text, tiny_teacher):
    with server.client() as c:
        ds = c.datasets.upload(tiny_text["valid"], name="retries")
        model = c.models.add(tiny_teacher, name="retries-teacher")
    return {
        "kind": "distill",
        "spec": {
            "student": {"model": model.id},
            "teachers": [{"model": model.id}],
            "teacher_mode": "online",
            "data": {"train": ds.id},
        },
    }


def job_ids(server) -> set[str]:
    with server.client() as c:
        return {j.id for j in c.jobs.list(kind="distill")}


def test_a_server_failing_the_first_attempt_creates_one_job(server, proxy, body, sleeps):
    # the API creates the job, but the client is told 502: the retry (same Idempotency-Key) gets the same job
    proxy.fault = lambda m, p, n: ("after", 502, {}) if m == "POST" and n == 1 else None
    before = job_ids(server)
    with Distillery(proxy.url, server.key) as c:
        job = c.jobs.create(body)
    keys = [h["Idempotency-Key"] for h in proxy.posts("/v1/jobs")]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert job_ids(server) - before == {job.id}
    assert len(sleeps) == 1


def test_a_lost_response_is_retried_with_the_same_key(server, body):
    """The connection dies after the request went out (no answer at all)."""
    inner, posts = httpx.HTTPTransport(), []

    class DropFirstResponse(httpx.BaseTransport):
        def handle_request(self, request):
            response = inner.handle_request(request)
            if request.method == "POST":
                posts.append(request.headers["Idempotency-Key"])
                if len(posts) == 1:
                    response.read()
                    raise httpx.ReadError("connection lost after sending", request=request)
            return response

    before = job_ids(server)
    http = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, transport=DropFirstResponse()
    )
    with Distillery(server.url, server.key, http_client=http, backoff=0.01) as c:
        job = c.jobs.create(body)
    assert len(posts) == 2 and posts[0] == posts[1]
    assert job_ids(server) - before == {job.id}


def test_async_post_retry_is_idempotent(server, proxy, body, monkeypatch):
    monkeypatch.setattr(_base.random, "uniform", lambda a, b: 0.0)
    proxy.fault = lambda m, p, n: ("after", 503, {}) if m == "POST" and n == 1 else None
    before = job_ids(server)

    async def main():
        async with AsyncDistillery(proxy.url, server.key, backoff=0.01) as c:
            return await c.jobs.create(body)

    job = asyncio.run(main())
    keys = [h["Idempotency-Key"] for h in proxy.posts("/v1/jobs")]
    assert len(keys) == 2 and keys[0] == keys[1] and job_ids(server) - before == {job.id}


def test_retry_after_is_honoured(server, proxy, sleeps):
    proxy.fault = lambda m, p, n: ("instead", 429, {"Retry-After": "3"}) if n == 1 else None
    with Distillery(proxy.url, server.key) as c:
        assert isinstance(list(c.jobs.list()), list)
    assert sleeps == [3.0]
    # as an HTTP date, and capped for a server asking for too long
    proxy.counts.clear()
    proxy.fault = lambda m, p, n: (
        ("instead", 503, {"Retry-After": formatdate(time.time() + 600, usegmt=True)}) if n == 1 else None
    )
    with Distillery(proxy.url, server.key) as c:
        list(c.models.list())
    assert sleeps[1] == _base.MAX_RETRY_AFTER


def test_backoff_grows_with_jitter_and_gives_up(server, proxy, sleeps):
    proxy.fault = lambda m, p, n: ("instead", 500, {})
    with Distillery(proxy.url, server.key, max_retries=4, backoff=0.5, max_backoff=3.0) as c:
        with pytest.raises(ServerError) as e:
            c.datasets.get("ds_x")
    assert e.value.status == 500 and proxy.counts[("GET", "/v1/datasets/ds_x")] == 5
    caps = [0.5, 1.0, 2.0, 3.0]
    assert len(sleeps) == 4 and all(c / 2 <= s <= c for s, c in zip(sleeps, caps))
    proxy.fault = lambda m, p, n: ("instead", 429, {})
    with Distillery(proxy.url, server.key, max_retries=1) as c, pytest.raises(RateLimitError):
        c.datasets.get("ds_y")


def test_client_errors_are_not_retried(server, proxy, sleeps):
    with Distillery(proxy.url, server.key) as c, pytest.raises(BadRequestError):
        c.jobs.create({"kind": "teacher_cache", "spec": {"teacher": "mdl_nope", "data": "ds_nope"}})
    assert len(proxy.posts("/v1/jobs")) == 1 and sleeps == []


def test_connection_errors_and_timeouts(server, proxy, sleeps):
    with Distillery(f"http://127.0.0.1:{free_port()}", server.key, max_retries=2) as c:
        with pytest.raises(APIConnectionError):
            list(c.jobs.list())
    assert len(sleeps) == 2
    proxy.fault = lambda m, p, n: ("stall", 1.0) if n == 1 else None  # longer than the client's timeout
    with Distillery(proxy.url, server.key, timeout=0.3) as c:
        assert c.jobs.list() is not None and isinstance(list(c.jobs.list()), list)
    assert proxy.counts[("GET", "/v1/jobs")] >= 2
