"""Streaming multipart uploads: the `file` part goes straight to a temporary file beside its final place,
hashed (sha256) and size-checked as it arrives, so a 2 GB dataset never sits in memory and an oversized one
is refused as soon as it crosses the limit. The client's file name is kept only as a label. What the services
receive is an `Upload` (service.domain.uploaded)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
from litestar import Request
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser, parse_options_header

from service.domain.uploaded import FileCheck, Upload
from service.http.problems import Problem

FILE_FIELD = "file"
MAX_TEXT_FIELD_BYTES = 4096
MULTIPART_OVERHEAD = 1 << 20  # headers and text fields allowed on top of the file itself
WRITE_BUFFER = 1 << 20


class UploadSlots:
    """How many uploads this process receives at once: each holds a socket, a temporary file and a thread
    for its writes, so past the bound an upload is refused at once (429) rather than queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def take(self) -> None:
        if self.active >= self.limit:
            raise Problem(
                429,
                f"the server is already receiving {self.limit} uploads; retry shortly",
                slug="too-many-uploads",
                title="Too many uploads at once",
                headers={"Retry-After": "10"},
            )
        self.active += 1

    def give_back(self) -> None:
        self.active -= 1


async def receive_upload(
    request: Request,
    tmp_dir: Path,
    max_bytes: int,
    text_fields: tuple[str, ...],
    check: Callable[[dict[str, str]], FileCheck] | None = None,
) -> Upload:
    """Parse a multipart/form-data body with one `file` part and optional `text_fields`. `check`, given the
    text fields sent before the file, makes the FileCheck that sees the file's bytes as they are written.

    Raises Problem: 415 (not multipart), 400 (malformed), 413 (file over `max_bytes`), 422 (missing file,
    unknown or oversized field), 429 (too many uploads at once), 507 (the disk is full). On any error the
    temporary file is gone.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise Problem(415, "expected a multipart/form-data body with a 'file' part")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)

    slots: UploadSlots = request.app.state.uploads
    slots.take()
    try:
        return await _receive(request, options["boundary"], tmp_dir, max_bytes, text_fields, check)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Problem(
                507,
                "the server's disk is full: the upload was not stored",
                slug="insufficient-storage",
                title="Insufficient storage",
                errors=[{"field": FILE_FIELD, "message": "no space left on the server's disk"}],
            ) from None
        raise
    finally:
        slots.give_back()


async def _receive(
    request: Request,
    boundary: str,
    tmp_dir: Path,
    max_bytes: int,
    text_fields: tuple[str, ...],
    check: Callable[[dict[str, str]], FileCheck] | None,
) -> Upload:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".upload-", suffix=".part")
    out = os.fdopen(fd, "wb")
    tmp = Path(tmp_name)
    try:
        upload = await _parse(request, boundary, out, tmp, max_bytes, text_fields, check)
        out.close()
    except BaseException:
        try:
            out.close()
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        raise
    return upload


async def _parse(
    request: Request,
    boundary: str,
    out,
    tmp: Path,
    max_bytes: int,
    text_fields: tuple[str, ...],
    check: Callable[[dict[str, str]], FileCheck] | None,
) -> Upload:
    digest = hashlib.sha256()
    fields: dict[str, str] = {}
    buffer = bytearray()
    filename: str | None = None
    size = 0
    seen_file = False
    segment: MultipartSegment | None = None
    text = bytearray()
    received = 0
    file_check: FileCheck | None = None
    check_fields: dict[str, str] = {}

    def write(data: bytes) -> None:  # in a worker thread: the check may parse what it sees
        out.write(data)
        if file_check is not None:
            file_check.feed(data)

    try:
        with PushMultipartParser(boundary, max_segment_count=len(text_fields) + 2) as parser:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes + MULTIPART_OVERHEAD:
                    raise _too_large(max_bytes)
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment = event
                        if segment.name == FILE_FIELD:
                            if seen_file:
                                raise _field_problem(FILE_FIELD, "only one file may be uploaded")
                            seen_file, filename = True, segment.filename
                            if check is not None:
                                check_fields = dict(fields)
                                file_check = check(check_fields)
                        elif segment.name not in text_fields:
                            allowed = ", ".join((FILE_FIELD,) + text_fields)
                            raise _field_problem(segment.name or "(unnamed)", f"unknown field (allowed: {allowed})")
                    elif event:  # payload bytes of the current part
                        assert segment is not None  # the parser sends a part's headers before its bytes
                        if segment.name == FILE_FIELD:
                            size += len(event)
                            if size > max_bytes:
                                raise _too_large(max_bytes)
                            digest.update(event)
                            buffer += event
                            if len(buffer) >= WRITE_BUFFER:
                                await anyio.to_thread.run_sync(write, bytes(buffer))
                                buffer.clear()
                        else:
                            text += event
                            if len(text) > MAX_TEXT_FIELD_BYTES:
                                raise _field_problem(segment.name, f"longer than {MAX_TEXT_FIELD_BYTES} bytes")
                    else:  # end of the current part
                        assert segment is not None
                        if segment.name != FILE_FIELD:
                            try:
                                fields[segment.name] = text.decode(segment.charset or "utf-8")
                            except (UnicodeDecodeError, LookupError):
                                raise _field_problem(segment.name, "not valid UTF-8 text") from None
                            text.clear()
                        segment = None
                if parser.closed:
                    break
    except (ParserError, ParserLimitReached) as e:
        raise Problem(400, f"malformed multipart/form-data body: {e}") from None
    if buffer:
        await anyio.to_thread.run_sync(write, bytes(buffer))
    if not seen_file:
        raise _field_problem(FILE_FIELD, "a file part named 'file' is required")
    await anyio.to_thread.run_sync(out.flush)
    return Upload(
        path=tmp,
        filename=filename,
        size=size,
        sha256=digest.hexdigest(),
        fields=fields,
        check=file_check,
        check_fields=check_fields,
    )


def _too_large(max_bytes: int) -> Problem:
    return Problem(
        413,
        f"the upload is larger than the limit of {max_bytes} bytes",
        errors=[{"field": FILE_FIELD, "message": f"larger than {max_bytes} bytes"}],
    )


def _field_problem(name: str, message: str) -> Problem:
    return Problem(422, f"{name}: {message}", errors=[{"field": name, "message": message}])
