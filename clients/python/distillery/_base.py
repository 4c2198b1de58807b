"""What the sync and async clients share: configuration, the retry policy, requests described as data, job
spec loading, and the download bookkeeping. No I/O on the network happens here."""

from __future__ import annotations

import hashlib
import random
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from ._config import resolve_config
from ._exceptions import ChecksumError, DistilleryError, JobWarningIssued
from .types import Artifact, Job

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 60.0
STREAM_READ_TIMEOUT = 60.0
USER_AGENT = "distillery-client/0.1"


def path_id(value: str) -> str:
    """An id as one URL path segment: whatever it holds cannot reach another route."""
    if not isinstance(value, str) or not value:
        raise DistilleryError(f"expected an id string, got {value!r}")
    return quote(value, safe="")


@dataclass
class Call:
    """One API call described as data, so the sync and async clients run the same calls."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    parse: Callable[[Any], Any] | None = None  # JSON body -> result; None: no body expected

    def __post_init__(self) -> None:
        if self.params:
            self.params = {k: v for k, v in self.params.items() if v is not None}
        if self.method == "POST" and not any(k.lower() == "idempotency-key" for k in self.headers):
            # one key per call, reused by its retries: a retried POST never creates a second object
            self.headers["Idempotency-Key"] = str(uuid.uuid4())

    def result(self, response: httpx.Response) -> Any:
        return self.parse(response.json()) if self.parse else None


def retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asked us to wait (`Retry-After` as seconds or an HTTP date), if it said."""
    value = response.headers.get("Retry-After") if response is not None else None
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
    """Settings and the retry policy. Arguments win over `DISTILLERY_*` variables, which win over the config
    file (see `_config`)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        profile: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        config = resolve_config(base_url, api_key, profile=profile, timeout=timeout, max_retries=max_retries)
        self.base_url = config.base_url
        self.api_key = config.api_key
        self.timeout = httpx.Timeout(config.timeout, connect=min(10.0, config.timeout))
        # an event stream is quiet between events; the server sends a keep-alive every 15 s
        self._stream_timeout = httpx.Timeout(
            config.timeout, connect=self.timeout.connect, read=max(config.timeout, STREAM_READ_TIMEOUT)
        )
        self.max_retries = config.max_retries
        self.config = config  # with `sources`: where the base URL and the key came from
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _default_headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _timeout_for(self, stream: bool, read: float | None) -> httpx.Timeout | Any:
        if not stream:
            return httpx.USE_CLIENT_DEFAULT
        t = self._stream_timeout
        return t if read is None else httpx.Timeout(connect=t.connect, read=read, write=t.write, pool=t.pool)

    def _should_retry(self, attempt: int, response: httpx.Response | None) -> bool:
        """Connection errors and 408/409/429/5xx are retried, `max_retries` times at most."""
        if attempt >= self.max_retries:
            return False
        return response is None or response.status_code in RETRY_STATUSES

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        after = retry_after(response)
        if after is not None:
            return min(after, MAX_RETRY_AFTER)
        cap = min(self.max_backoff, self.backoff * 2**attempt)
        return cap / 2 + random.uniform(0, cap / 2)  # exponential, with jitter so clients don't retry in step

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"


# ------------------------------------------------------------------------------------------- downloads


def artifact_target(dest: Path, artifact: Artifact) -> Path:
    """Where an artifact goes under `dest`, keeping its folders (`student/config.json`) but never leaving it."""
    parts = PurePosixPath(artifact.name).parts
    if (
        not parts
        or PurePosixPath(artifact.name).is_absolute()
        or any(p in ("..", ".", "") for p in parts)
        or any("\\" in p or ":" in p for p in parts)
    ):
        raise DistilleryError(f"refusing artifact name {artifact.name!r}: not a plain relative path")
    target = dest.joinpath(*parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise DistilleryError(f"refusing artifact name {artifact.name!r}: it leaves {dest}")
    return target


class PartialFile:
    """A download in progress at `<target>.part`: how much we have, its running hash, and how to finish."""

    def __init__(self, target: Path, artifact: Artifact) -> None:
        self.target, self.artifact = target, artifact
        self.part = target.with_name(target.name + ".part")
        self.hash = hashlib.sha256()
        self.offset = 0
        if self.part.exists() and self.part.stat().st_size < artifact.size_bytes:
            with self.part.open("rb") as fh:  # resume: hash what is already here
                while chunk := fh.read(1 << 20):
                    self.hash.update(chunk)
            self.offset = self.part.stat().st_size
        else:
            self.part.unlink(missing_ok=True)

    def already_done(self) -> bool:
        """The target exists with the right hash (a download repeated): nothing to fetch."""
        if not self.target.is_file() or self.target.stat().st_size != self.artifact.size_bytes:
            return False
        h = hashlib.sha256()
        with self.target.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == self.artifact.sha256

    def request_headers(self) -> dict[str, str]:
        if not self.offset:
            return {}
        # If-Range: resume only if the server still has the same version; otherwise it sends the whole file
        return {"Range": f"bytes={self.offset}-", "If-Range": f'"{self.artifact.sha256}"'}

    def begin(self, response: httpx.Response) -> Any:
        """Open the .part file for this response: appending after a 206, from scratch after a 200."""
        if response.status_code != 206:
            self.hash, self.offset = hashlib.sha256(), 0
        self.part.parent.mkdir(parents=True, exist_ok=True)
        return self.part.open("ab" if self.offset else "wb")

    def write(self, fh: Any, chunk: bytes) -> None:
        fh.write(chunk)
        self.hash.update(chunk)
        self.offset += len(chunk)

    def finish(self, response: httpx.Response) -> Path:
        expected = (response.headers.get("X-Content-SHA256") or self.artifact.sha256).lower()
        got = self.hash.hexdigest()
        if got != expected:
            self.part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{self.artifact.name}: sha256 {got} does not match the server's {expected}; "
                "the partial file was removed, download again"
            )
        self.part.replace(self.target)
        return self.target


def warn_about(job: Job) -> None:
    """`wait` says out loud what the finished job warns about (e.g. it shipped the starting student)."""
    for w in job.warnings:
        warnings.warn(f"job {job.id}: {w.message}", JobWarningIssued, stacklevel=3)
