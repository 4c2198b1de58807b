"""Streaming multipart uploads: the `file` part goes straight to a temporary file beside its final place,
hashed (sha256) and size-checked as it arrives, so a 2 GB dataset never sits in memory and an oversized one
is refused as soon as it crosses the limit. The client's file name is kept only as a label."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
from litestar import Request
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser, parse_options_header

from service.api.problems import Problem

FILE_FIELD = "file"
MAX_TEXT_FIELD_BYTES = 4096
MULTIPART_OVERHEAD = 1 << 20      # headers and text fields allowed on top of the file itself
WRITE_BUFFER = 1 << 20


@dataclass
class Upload:
    path: Path                    # the temporary file holding the `file` part; the caller moves or deletes it
    filename: str | None          # as the client named it: a label for messages, never a path
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def fingerprint(self, method: str, path: str) -> str:
        """What identifies this request for Idempotency-Key: the multipart boundary is random, so not the raw
        bytes but the fields, the file name and the file's hash."""
        h = hashlib.sha256()
        parts = [method.upper(), path, self.filename or "", self.sha256]
        parts += [f"{k}={v}" for k, v in sorted(self.fields.items())]
        for part in parts:
            data = part.encode()
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
        return h.hexdigest()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


async def receive_upload(request: Request, tmp_dir: Path, max_bytes: int, text_fields: tuple[str, ...]) -> Upload:
    """Parse a multipart/form-data body with one `file` part and optional `text_fields`.

    Raises Problem: 415 (not multipart), 400 (malformed), 413 (file over `max_bytes`), 422 (missing file,
    unknown or oversized field). On any error the temporary file is gone.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != "multipart/form-data" or not options.get("boundary"):
        raise Problem(415, "expected a multipart/form-data body with a 'file' part")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise _too_large(max_bytes)

    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".upload-", suffix=".part")
    out = os.fdopen(fd, "wb")
    tmp = Path(tmp_name)
    try:
        upload = await _parse(request, options["boundary"], out, tmp, max_bytes, text_fields)
    except BaseException:
        out.close()
        tmp.unlink(missing_ok=True)
        raise
    out.close()
    return upload


async def _parse(request: Request, boundary: str, out, tmp: Path, max_bytes: int,
                 text_fields: tuple[str, ...]) -> Upload:
    digest = hashlib.sha256()
    fields: dict[str, str] = {}
    buffer = bytearray()
    filename: str | None = None
    size = 0
    seen_file = False
    segment: MultipartSegment | None = None
    text = bytearray()
    received = 0
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
                        elif segment.name not in text_fields:
                            allowed = ", ".join((FILE_FIELD,) + text_fields)
                            raise _field_problem(segment.name or "(unnamed)", f"unknown field (allowed: {allowed})")
                    elif event:   # payload bytes of the current part
                        if segment.name == FILE_FIELD:
                            size += len(event)
                            if size > max_bytes:
                                raise _too_large(max_bytes)
                            digest.update(event)
                            buffer += event
                            if len(buffer) >= WRITE_BUFFER:
                                await anyio.to_thread.run_sync(out.write, bytes(buffer))
                                buffer.clear()
                        else:
                            text += event
                            if len(text) > MAX_TEXT_FIELD_BYTES:
                                raise _field_problem(segment.name, f"longer than {MAX_TEXT_FIELD_BYTES} bytes")
                    else:         # end of the current part
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
        await anyio.to_thread.run_sync(out.write, bytes(buffer))
    if not seen_file:
        raise _field_problem(FILE_FIELD, "a file part named 'file' is required")
    return Upload(path=tmp, filename=filename, size=size, sha256=digest.hexdigest(), fields=fields)


def _too_large(max_bytes: int) -> Problem:
    return Problem(413, f"the upload is larger than the limit of {max_bytes} bytes",
                   errors=[{"field": FILE_FIELD, "message": f"larger than {max_bytes} bytes"}])


def _field_problem(name: str, message: str) -> Problem:
    return Problem(422, f"{name}: {message}", errors=[{"field": name, "message": message}])
