"""Artifact downloads from the SDK against the real API process of conftest.py: every file of a job under its
folders, sha256-checked, resumed with HTTP Range (+ If-Range) after a cut or from a `.part` left by an earlier
run, nothing re-fetched when the files already match, checksum failures cleaned up, and artifact names that
would leave the destination refused. A transport wrapper counts requests and bytes, and cuts bodies."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import httpx
import pytest

from distillery import APIConnectionError, AsyncDistillery, ChecksumError, Distillery, DistilleryError
from service.core.db.models import Artifact as ArtifactRow
from service.core.db.models import new_id

CONTENT = "/content"
SIZE = 1_000_000  # ~4 of the server's 256 KiB chunks


class _Counted(httpx.SyncByteStream):
    """Passes the body through, counting its bytes; with a `cut`, raises ReadError after that many."""

    def __init__(self, inner: httpx.SyncByteStream, log: dict, cut: int | None) -> None:
        self.inner, self.log, self.cut = inner, log, cut

    def __iter__(self):
        for chunk in self.inner:
            if self.cut is not None and self.log["bytes"] + len(chunk) >= self.cut:
                chunk = chunk[: self.cut - self.log["bytes"]]
                self.log["bytes"] += len(chunk)
                yield chunk
                raise httpx.ReadError("connection reset mid-body")
            self.log["bytes"] += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class _AsyncCounted(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, log: dict, cut: int | None) -> None:
        self.inner, self.log, self.cut = inner, log, cut

    async def __aiter__(self):
        async for chunk in self.inner:
            if self.cut is not None and self.log["bytes"] + len(chunk) >= self.cut:
                chunk = chunk[: self.cut - self.log["bytes"]]
                self.log["bytes"] += len(chunk)
                yield chunk
                raise httpx.ReadError("connection reset mid-body")
            self.log["bytes"] += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class Content:
    """What happened to `/content` requests: each one's request, status and body bytes received. `cuts[n]`
    (0-based request index) breaks that body after so many bytes."""

    def __init__(self, cuts: dict[int, int] | None = None) -> None:
        self.cuts = cuts or {}
        self.log: list[dict] = []

    @property
    def requests(self) -> list[httpx.Request]:
        return [x["request"] for x in self.log]

    @property
    def total_bytes(self) -> int:
        return sum(x["bytes"] for x in self.log)

    def wrap(self, request: httpx.Request, response: httpx.Response, stream_type) -> httpx.Response:
        if not request.url.path.endswith(CONTENT):
            return response
        entry = {"request": request, "status": response.status_code, "bytes": 0}
        cut = self.cuts.get(len(self.log))
        self.log.append(entry)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=stream_type(response.stream, entry, cut),
            extensions=response.extensions,
        )


class _Transport(httpx.BaseTransport):
    def __init__(self, content: Content) -> None:
        self.content, self.inner = content, httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.content.wrap(request, self.inner.handle_request(request), _Counted)

    def close(self) -> None:
        self.inner.close()


class _AsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, content: Content) -> None:
        self.content, self.inner = content, httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.content.wrap(request, await self.inner.handle_async_request(request), _AsyncCounted)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _headers(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.key}", "Accept": "application/json"}


def counting_client(server, content: Content, **kw) -> Distillery:
    http = httpx.Client(base_url=server.url, headers=_headers(server), transport=_Transport(content))
    return server.client(http_client=http, **kw)


def counting_async_client(server, content: Content, **kw) -> AsyncDistillery:
    http = httpx.AsyncClient(base_url=server.url, headers=_headers(server), transport=_AsyncTransport(content))
    return AsyncDistillery(server.url, server.key, http_client=http, **{"backoff": 0.01, **kw})


def finished_job(server, files: dict[str, bytes]) -> str:
    job_id = server.insert_job()
    for name, data in files.items():
        server.insert_artifact(job_id, name, data)
    server.finish(job_id)
    return job_id


def adapter_files() -> dict[str, bytes]:
    return {
        "adapters.safetensors": os.urandom(SIZE),
        "adapter_config.json": b'{"fine_tune_type": "lora", "num_layers": 2}',
        "student/config.json": b'{"num_hidden_layers": 2}',
        "student/model.safetensors": os.urandom(300_000),
    }


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def insert_named(server, job_id: str, name: str, content: bytes = b"payload") -> None:
    """An artifact row with any name (a misbehaving worker's), its file safely inside the artifact root."""
    path = server.artifact_root / "odd" / new_id("f")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with server.db() as session:
        session.add(
            ArtifactRow(
                id=new_id("art"),
                project_id=server.project_id,
                job_id=job_id,
                name=name,
                path=str(path),
                size_bytes=len(content),
                sha256=hashlib.sha256(content).hexdigest(),
                content_type="application/octet-stream",
            )
        )


# ------------------------------------------------------------------------------------------------------ sync


def test_download_writes_every_artifact_keeping_folders(server, tmp_path):
    files = adapter_files()
    job_id = finished_job(server, files)
    dest = tmp_path / "out"
    content = Content()
    with counting_client(server, content) as c:
        paths = c.artifacts.download(job_id, dest)
        assert sorted(p.relative_to(dest).as_posix() for p in paths) == sorted(files)
        assert files_under(dest) == files  # exact bytes, folders kept, no .part left over
        assert len(content.requests) == len(files)
        assert all(x["status"] == 200 and "range" not in x["request"].headers for x in content.log)
        assert content.total_bytes == sum(map(len, files.values()))

        again = c.artifacts.download(job_id, dest)  # everything already matches its sha256
        assert sorted(again) == sorted(paths)
        assert len(content.requests) == len(files)  # nothing fetched the second time
        assert files_under(dest) == files


def test_download_refetches_a_file_that_no_longer_matches(server, tmp_path):
    files = adapter_files()
    job_id = finished_job(server, files)
    dest = tmp_path / "out"
    content = Content()
    with counting_client(server, content) as c:
        c.artifacts.download(job_id, dest)
        (dest / "student" / "config.json").write_bytes(b'{"num_hidden_layers": 9}')  # same length, edited
        (dest / "adapter_config.json").unlink()
        n = len(content.requests)
        c.artifacts.download(job_id, dest)
        refetched = [r.url.path for r in content.requests[n:]]
        assert len(refetched) == 2
    assert files_under(dest) == files


def test_download_names_filter(server, tmp_path):
    files = adapter_files()
    job_id = finished_job(server, files)
    with server.client() as c:
        paths = c.artifacts.download(job_id, tmp_path, names=lambda name: name.startswith("student/"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        "student/config.json",
        "student/model.safetensors",
    ]
    assert files_under(tmp_path) == {k: v for k, v in files.items() if k.startswith("student/")}


def test_download_resumes_with_range_after_a_cut(server, tmp_path):
    data = os.urandom(SIZE)
    job_id = finished_job(server, {"adapters.safetensors": data})
    half = SIZE // 2
    content = Content(cuts={0: half})
    with counting_client(server, content) as c:
        [path] = c.artifacts.download(job_id, tmp_path)
    assert path.read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))
    first, second = content.log
    assert "range" not in first["request"].headers and first["bytes"] == half
    assert second["request"].headers["Range"] == f"bytes={half}-"
    assert second["request"].headers["If-Range"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert second["status"] == 206
    assert second["bytes"] == SIZE - half
    assert content.total_bytes == SIZE  # the first half was not fetched twice


def test_download_resumes_after_repeated_cuts_then_gives_up(server, tmp_path):
    data = os.urandom(SIZE)
    job_id = finished_job(server, {"adapters.safetensors": data})
    # every attempt breaks after 100 kB more: with 2 retries, 3 attempts get 300 kB, then the client gives up
    content = Content(cuts={i: 100_000 for i in range(10)})
    with counting_client(server, content, max_retries=2) as c:
        with pytest.raises(APIConnectionError, match="adapters.safetensors"):
            c.artifacts.download(job_id, tmp_path)
    assert len(content.requests) == 3
    assert [r.headers.get("Range") for r in content.requests] == [None, "bytes=100000-", "bytes=200000-"]
    part = tmp_path / "adapters.safetensors.part"
    assert part.read_bytes() == data[:300_000]  # kept for the next call
    assert not (tmp_path / "adapters.safetensors").exists()

    content = Content()
    with counting_client(server, content) as c:  # a later run goes on from the .part
        c.artifacts.download(job_id, tmp_path)
    assert [r.headers.get("Range") for r in content.requests] == ["bytes=300000-"]
    assert content.total_bytes == SIZE - 300_000
    assert (tmp_path / "adapters.safetensors").read_bytes() == data
    assert not part.exists()


def test_download_resumes_an_existing_part_file(server, tmp_path):
    data = os.urandom(SIZE)
    job_id = finished_job(server, {"student/model.safetensors": data})
    part = tmp_path / "student" / "model.safetensors.part"
    part.parent.mkdir()
    part.write_bytes(data[:300_000])  # left by an interrupted earlier run
    content = Content()
    with counting_client(server, content) as c:
        c.artifacts.download(job_id, tmp_path)
    [only] = content.log
    assert only["request"].headers["Range"] == "bytes=300000-"
    assert only["status"] == 206 and only["bytes"] == SIZE - 300_000
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == data
    assert not part.exists()


def test_garbage_part_file_gives_checksum_error_then_the_next_call_succeeds(server, tmp_path):
    """A `.part` that holds other bytes: the client asks for the rest (Range, If-Range = the artifact's ETag,
    which matches, so the server sends 206), the joined file fails the sha256 check: ChecksumError, and the
    bad `.part` is gone, so the next call downloads the whole file and succeeds."""
    data = os.urandom(SIZE)
    job_id = finished_job(server, {"adapters.safetensors": data})
    part = tmp_path / "adapters.safetensors.part"
    part.write_bytes(os.urandom(4096))
    content = Content()
    with counting_client(server, content) as c:
        with pytest.raises(ChecksumError, match="adapters.safetensors"):
            c.artifacts.download(job_id, tmp_path)
        assert content.log[0]["request"].headers["Range"] == "bytes=4096-"
        assert content.log[0]["status"] == 206
        assert not part.exists()
        assert not (tmp_path / "adapters.safetensors").exists()

        c.artifacts.download(job_id, tmp_path)
    assert "range" not in content.log[1]["request"].headers
    assert content.log[1]["status"] == 200
    assert (tmp_path / "adapters.safetensors").read_bytes() == data


def test_part_file_longer_than_the_artifact_is_discarded(server, tmp_path):
    data = os.urandom(50_000)
    job_id = finished_job(server, {"adapters.safetensors": data})
    (tmp_path / "adapters.safetensors.part").write_bytes(os.urandom(80_000))
    content = Content()
    with counting_client(server, content) as c:
        c.artifacts.download(job_id, tmp_path)
    assert "range" not in content.log[0]["request"].headers
    assert files_under(tmp_path) == {"adapters.safetensors": data}


def test_if_range_mismatch_restarts_from_scratch(server, tmp_path):
    """The artifact changed on the server since the client listed it: its If-Range (the old sha256) no longer
    matches the ETag, the server sends the whole new file (200), and the client keeps none of its old `.part`."""
    old = os.urandom(200_000)
    job_id = server.insert_job()
    server.insert_artifact(job_id, "adapters.safetensors", old)
    server.finish(job_id)
    content = Content()
    with counting_client(server, content) as c:
        [listed] = c.artifacts.list(job_id)
        part = tmp_path / "adapters.safetensors.part"
        part.write_bytes(old[:50_000])
        new = os.urandom(200_000)
        path = Path(server.artifact_root) / "jobs" / server.project_id / job_id / "adapters.safetensors"
        path.write_bytes(new)
        with server.db() as session:
            row = session.get(ArtifactRow, listed.id)
            row.sha256 = hashlib.sha256(new).hexdigest()
        c.artifacts.download_file(listed, tmp_path / "adapters.safetensors")
    [only] = content.log
    assert only["request"].headers["If-Range"] == f'"{hashlib.sha256(old).hexdigest()}"'
    assert only["status"] == 200 and only["bytes"] == len(new)
    assert files_under(tmp_path) == {"adapters.safetensors": new}


def test_checksum_failure_leaves_no_file(server, tmp_path):
    data = os.urandom(200_000)
    job_id = server.insert_job()
    server.insert_artifact(job_id, "student/model.safetensors", data)
    server.finish(job_id)
    # the file on the server's disk changes after it was registered: same length, other bytes
    on_disk = Path(server.artifact_root) / "jobs" / server.project_id / job_id / "student" / "model.safetensors"
    on_disk.write_bytes(bytes(b ^ 0xFF for b in data[:10]) + data[10:])
    dest = tmp_path / "out"
    with server.client() as c:
        with pytest.raises(ChecksumError, match="model.safetensors"):
            c.artifacts.download(job_id, dest)
    assert not (dest / "student" / "model.safetensors").exists()
    assert not list(dest.rglob("*.part"))
    assert not [p for p in dest.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/abs-escape.txt", "student/../../escape.txt", "..\\escape.txt", "C:/escape.txt"]
)
def test_unsafe_artifact_names_are_refused(server, tmp_path, name):
    job_id = server.insert_job()
    insert_named(server, job_id, name)
    server.finish(job_id)
    dest = tmp_path / "box" / "dest"
    content = Content()
    with counting_client(server, content) as c:
        with pytest.raises(DistilleryError, match="refusing artifact name"):
            c.artifacts.download(job_id, dest)
    assert content.requests == []  # refused before fetching anything
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not Path("/abs-escape.txt").exists()


def test_artifact_under_a_symlink_leaving_dest_is_refused(server, tmp_path):
    job_id = server.insert_job()
    server.insert_artifact(job_id, "student/config.json", b"{}")
    server.finish(job_id)
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "student").symlink_to(outside, target_is_directory=True)
    with server.client() as c:
        with pytest.raises(DistilleryError, match="leaves"):
            c.artifacts.download(job_id, dest)
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------------------------------- async


def test_async_download_and_second_download_fetches_nothing(server, tmp_path):
    files = adapter_files()
    job_id = finished_job(server, files)
    dest = tmp_path / "out"
    content = Content()

    async def main():
        async with counting_async_client(server, content) as c:
            paths = await c.artifacts.download(job_id, dest)
            n = len(content.requests)
            again = await c.artifacts.download(job_id, dest)
            return paths, again, n

    paths, again, n = asyncio.run(main())
    assert sorted(p.relative_to(dest).as_posix() for p in paths) == sorted(files)
    assert files_under(dest) == files
    assert n == len(files) and len(content.requests) == n
    assert sorted(again) == sorted(paths)


def test_async_download_resumes_with_range_after_a_cut(server, tmp_path):
    data = os.urandom(SIZE)
    job_id = finished_job(server, {"student/model.safetensors": data})
    content = Content(cuts={0: 400_000})

    async def main():
        async with counting_async_client(server, content) as c:
            return await c.artifacts.download(job_id, tmp_path)

    [path] = asyncio.run(main())
    assert path.read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))
    first, second = content.log
    assert first["bytes"] == 400_000
    assert second["request"].headers["Range"] == "bytes=400000-"
    assert second["request"].headers["If-Range"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert second["status"] == 206
    assert content.total_bytes == SIZE


def test_async_checksum_failure_and_unsafe_name(server, tmp_path):
    data = os.urandom(100_000)
    job_id = server.insert_job()
    server.insert_artifact(job_id, "adapters.safetensors", data)
    server.finish(job_id)
    on_disk = Path(server.artifact_root) / "jobs" / server.project_id / job_id / "adapters.safetensors"
    on_disk.write_bytes(os.urandom(len(data)))
    bad = server.insert_job()
    insert_named(server, bad, "../escape.txt")
    server.finish(bad)
    dest = tmp_path / "out"

    async def main():
        async with AsyncDistillery(server.url, server.key, backoff=0.01) as c:
            with pytest.raises(ChecksumError):
                await c.artifacts.download(job_id, dest)
            with pytest.raises(DistilleryError, match="refusing"):
                await c.artifacts.download(bad, dest)

    asyncio.run(main())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
