"""Shared configuration, request, error and retry logic for the Distillery SDK."""

from __future__ import annotations

import os
import random
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class DistilleryError(Exception):
    """Base of every error the SDK raises."""


class APIError(DistilleryError):
    """An error response; carries the RFC 9457 problem details."""

    def __init__(self, status: int, problem: dict[str, Any], response: httpx.Response | None = None) -> None:
        self.status = status
        self.problem = problem
        self.response = response
        self.type = problem.get("type")
        self.title = problem.get("title")
        self.detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        super().__init__(f"{status}: {self.detail}")


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class RateLimitError(APIError):
    pass


class ServerError(APIError):
    pass


class JobFailedError(DistilleryError):
    def __init__(self, job: Any) -> None:
        self.job = job
        err = getattr(job, "error", None) or {}
        if not isinstance(err, dict):
            err = err.model_dump() if hasattr(err, "model_dump") else {}
        self.code = err.get("code")
        self.message = err.get("message")
        super().__init__(f"job {job.id} {job.status}: {self.code or ''} {self.message or ''}".strip())


def error_for(response: httpx.Response) -> APIError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": response.text[:500] or response.reason_phrase}
    s = response.status_code
    cls = (BadRequestError if s in (400, 422) else AuthenticationError if s in (401, 403) else
           NotFoundError if s == 404 else ConflictError if s == 409 else RateLimitError if s == 429 else
           ServerError if s >= 500 else APIError)
    return cls(s, problem, response)


def retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class BaseClient:
    """Config (args or DISTILLERY_BASE_URL / DISTILLERY_API_KEY) and retry policy, shared by sync and async."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0) -> None:
        self.base_url = (base_url or os.environ.get("DISTILLERY_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("DISTILLERY_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "distillery-client/0.1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = retry_after(response)
        if after is not None:
            return min(after, 60.0)
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base / 2 + random.uniform(0, base / 2)   # exponential with jitter

    @staticmethod
    def _prepare_headers(method: str, headers: dict[str, str] | None) -> dict[str, str]:
        out = dict(headers or {})
        if method.upper() == "POST" and not any(k.lower() == "idempotency-key" for k in out):
            out["Idempotency-Key"] = str(uuid.uuid4())   # one key for the call, reused across its retries
        return out

    def _should_retry(self, attempt: int, response: httpx.Response | None) -> bool:
        if attempt >= self.max_retries:
            return False
        return response is None or response.status_code in RETRY_STATUSES


class SyncTransport(BaseClient):
    def __init__(self, *args: Any, http_client: httpx.Client | None = None, transport: httpx.BaseTransport | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._http = http_client or httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self.timeout,
                                                 transport=transport)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, stream: bool = False,
                **kw: Any) -> httpx.Response:
        headers = self._prepare_headers(method, headers)
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                request = self._http.build_request(method, path, headers=headers, **kw)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError:
                if not self._should_retry(attempt, None):
                    raise
            else:
                if response.status_code < 400:
                    return response
                if not self._should_retry(attempt, response):
                    if stream:
                        response.read()
                    raise error_for(response)
                response.close()
            time.sleep(self._delay(attempt, response))
            attempt += 1
            for f in kw.get("files", {}).values() if isinstance(kw.get("files"), dict) else ():
                fh = f[1] if isinstance(f, tuple) else f
                if hasattr(fh, "seek"):
                    fh.seek(0)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()
