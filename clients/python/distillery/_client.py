"""The synchronous client: `Distillery(base_url=None, api_key=None)` with resources datasets, models, jobs,
artifacts."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ._base import DistilleryError, JobFailedError, SyncTransport
from .types import TERMINAL, Artifact, Dataset, Event, Job, MetricPoint, Model


def load_job_spec(spec: Any) -> dict[str, Any]:
    """A job body from a dict, a YAML string, or a path to a YAML/JSON file."""
    if isinstance(spec, dict):
        body = spec
    else:
        text = Path(spec).read_text() if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec
                                                                    and Path(spec).is_file()) else str(spec)
        body = yaml.safe_load(text)
    if not isinstance(body, dict) or "kind" not in body:
        raise DistilleryError("a job needs a mapping with `kind` and `spec`")
    return body


class _Resource:
    def __init__(self, client: Distillery) -> None:
        self._t = client._transport

    def _pages(self, path: str, params: dict[str, Any], limit: int | None = None) -> Iterator[dict[str, Any]]:
        params = {k: v for k, v in params.items() if v is not None}
        if limit:
            params["limit"] = limit
        while True:
            page = self._t.json("GET", path, params=params)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            params["after"] = page["data"][-1]["id"]


class Datasets(_Resource):
    def upload(self, path: str | Path, name: str | None = None, format: str | None = None) -> Dataset:
        path = Path(path)
        data = {k: v for k, v in {"name": name, "format": format}.items() if v}
        with path.open("rb") as fh:
            return Dataset(**self._t.json("POST", "/v1/datasets", files={"file": (path.name, fh)}, data=data))

    def list(self, limit: int | None = None) -> list[Dataset]:
        return [Dataset(**d) for d in self._pages("/v1/datasets", {}, limit)]

    def get(self, id: str) -> Dataset:
        return Dataset(**self._t.json("GET", f"/v1/datasets/{id}"))

    def delete(self, id: str) -> None:
        self._t.request("DELETE", f"/v1/datasets/{id}")


class Models(_Resource):
    def add(self, path: str | Path, name: str | None = None) -> Model:
        body = {"path": str(path)} | ({"name": name} if name else {})
        return Model(**self._t.json("POST", "/v1/models", json=body))

    def list(self, limit: int | None = None) -> list[Model]:
        return [Model(**d) for d in self._pages("/v1/models", {}, limit)]

    def get(self, id: str) -> Model:
        return Model(**self._t.json("GET", f"/v1/models/{id}"))


class Jobs(_Resource):
    def create(self, spec: Any, *, idempotency_key: str | None = None) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job(**self._t.json("POST", "/v1/jobs", json=load_job_spec(spec), headers=headers))

    def list(self, status: str | None = None, kind: str | None = None, limit: int | None = None) -> Iterator[Job]:
        for d in self._pages("/v1/jobs", {"status": status, "kind": kind}, limit):
            yield Job(**d)

    def get(self, id: str) -> Job:
        return Job(**self._t.json("GET", f"/v1/jobs/{id}"))

    def cancel(self, id: str) -> Job:
        return Job(**self._t.json("POST", f"/v1/jobs/{id}/cancel"))

    def events(self, id: str, after: int | None = None) -> list[Event]:
        out: list[Event] = []
        params: dict[str, Any] = {} if after is None else {"after": after}
        while True:
            page = self._t.json("GET", f"/v1/jobs/{id}/events", params=params)
            out += [Event(**e) for e in page["data"]]
            if not page.get("has_more") or not page["data"]:
                return out
            params["after"] = page["data"][-1]["id"]

    def metrics(self, id: str, name: str | None = None) -> list[MetricPoint]:
        params = {"name": name} if name else {}
        return [MetricPoint(**m) for m in self._t.json("GET", f"/v1/jobs/{id}/metrics", params=params)["data"]]

    def wait(self, id: str, poll: float = 2.0, timeout: float | None = None, on_update: Any = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(id)
            if on_update:
                on_update(job)
            if job.status in TERMINAL:
                if job.status != "succeeded":
                    raise JobFailedError(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {id} still {job.status} after {timeout}s")
            time.sleep(poll)


class Artifacts(_Resource):
    def list(self, job_id: str) -> list[Artifact]:
        return [Artifact(**a) for a in self._t.json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]]

    def download(self, job_id: str, dest: str | Path) -> list[Path]:
        """Write every artifact of the job into `dest` (sha256 checked against X-Content-SHA256)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for art in self.list(job_id):
            target = dest / Path(art.name).name
            tmp = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            response = self._t.request("GET", f"/v1/artifacts/{art.id}/content", stream=True)
            try:
                with tmp.open("wb") as fh:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        fh.write(chunk)
                expected = response.headers.get("X-Content-SHA256") or art.sha256
            finally:
                response.close()
            if expected and digest.hexdigest() != expected.lower():
                tmp.unlink(missing_ok=True)
                raise DistilleryError(f"sha256 mismatch for {art.name}: got {digest.hexdigest()}, expected {expected}")
            tmp.replace(target)
            written.append(target)
        return written


class Distillery:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, **kw: Any) -> None:
        self._transport = SyncTransport(base_url, api_key, **kw)
        self.base_url = self._transport.base_url
        self.datasets = Datasets(self)
        self.models = Models(self)
        self.jobs = Jobs(self)
        self.artifacts = Artifacts(self)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Distillery:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
