"""A file a client uploaded, as the domain services receive it: already on disk (a temporary file beside its
final place), hashed, sized, with the text fields sent alongside. How it is received (streamed multipart, size
limits) is the HTTP edge's business: service.http.uploads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class FileCheck(Protocol):
    """Sees the file's bytes as they arrive (in a worker thread), e.g. to validate a dataset while it streams."""

    def feed(self, chunk: bytes) -> None: ...


@dataclass
class Upload:
    path: Path  # the temporary file holding the `file` part; the caller moves or deletes it
    filename: str | None  # as the client named it: a label for messages, never a path
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)
    check: Any = None  # the FileCheck that saw the bytes, with the text fields known when it began
    check_fields: dict[str, str] = field(default_factory=dict)

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
        """Remove the temporary file (nothing once it was moved into place)."""
        self.path.unlink(missing_ok=True)
