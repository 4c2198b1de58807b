"""`/v1/artifacts/{id}` and its content: streamed, with the sha256 in headers and HTTP Range for resuming."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import anyio
from litestar import Controller, Request, Response, get
from litestar.datastructures import State
from litestar.response import Stream
from sqlalchemy.orm import Session, sessionmaker

from service.core.db.models import Artifact
from service.core.errors import NotFound
from service.core.storage import resolve_inside
from service.http.deps import CallerDep, PathId, SessionDep
from service.http.problems import Problem
from service.http.schemas import ArtifactOut, artifact_out

CHUNK = 256 << 10
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ArtifactController(Controller):
    path = "/artifacts"
    tags = ["artifacts"]

    @get("/{artifact_id:str}", sync_to_thread=True, summary="Get an artifact")
    def retrieve(self, session: SessionDep, caller: CallerDep, artifact_id: PathId) -> ArtifactOut:
        return artifact_out(_get(session, caller.project_id, artifact_id))

    @get(
        "/{artifact_id:str}/content",
        summary="Download an artifact (Range supported)",
        description="Headers: `X-Content-SHA256` (hex) and `Digest: sha-256=<base64>` of the whole file, "
        "`ETag`, `Accept-Ranges: bytes`. A single `Range: bytes=a-b` gives 206; an unsatisfiable "
        "one 416.",
    )
    async def content(self, request: Request, caller: CallerDep, state: State, artifact_id: PathId) -> Response:
        row, path = await anyio.to_thread.run_sync(
            _locate, state.sessions, state.settings.artifact_root, caller.project_id, artifact_id
        )
        size = (await anyio.Path(path).stat()).st_size
        etag = f'"{row.sha256}"'
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "X-Content-SHA256": row.sha256,
            "Digest": "sha-256=" + base64.b64encode(bytes.fromhex(row.sha256)).decode(),
            "Content-Disposition": f'attachment; filename="{_download_name(row.name)}"',
        }
        wanted = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if wanted and if_range and if_range.strip() != etag:
            wanted = None  # the client's copy is of another version: send it all
        span = parse_range(wanted, size) if wanted else None
        if isinstance(span, str):  # "unsatisfiable"
            raise Problem(
                416,
                f"range {wanted!r} is outside the {size} bytes of artifact {artifact_id}",
                headers={"Content-Range": f"bytes */{size}"},
            )
        if span is None:
            headers["Content-Length"] = str(size)
            return Stream(_read(path, 0, size), media_type=row.content_type, headers=headers)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        return Stream(_read(path, start, end + 1), status_code=206, media_type=row.content_type, headers=headers)


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(first, last) byte of a single `bytes=` range, "unsatisfiable", or None to ignore the header (malformed or
    several ranges: RFC 9110 lets a server answer those with the whole content)."""
    m = _RANGE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last N bytes
        n = _offset(m[2])
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = _offset(m[1])
    end = _offset(m[2]) if m[2] else size - 1
    if m[2] and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _offset(digits: str) -> int:
    """A byte offset from the header; beyond any file when it has more digits than int() would parse safely."""
    return int(digits) if len(digits) <= 18 else 10**18


def _get(session: Session, project_id: str, artifact_id: str) -> Artifact:
    row = session.get(Artifact, artifact_id)
    if row is None or row.project_id != project_id:
        raise NotFound("artifact", artifact_id)
    return row


def _locate(
    factory: sessionmaker[Session], artifact_root: Path, project_id: str, artifact_id: str
) -> tuple[Artifact, Path]:
    with factory() as session:
        row = _get(session, project_id, artifact_id)
    path = resolve_inside(artifact_root, row.path)
    if path is None:
        raise NotFound("artifact", artifact_id, f"the file of artifact {artifact_id} is no longer available")
    return row, path


def _download_name(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return re.sub(r"[^\w.+-]", "_", base) or "artifact"


async def _read(path: Path, start: int, stop: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        await f.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = await f.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
