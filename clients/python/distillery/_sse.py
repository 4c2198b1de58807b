"""Server-sent events: a line decoder (the WHATWG rules the API needs) shared by the sync and async streams."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Message:
    event: str  # `state` (a job snapshot, no id), `ping` (a keep-alive comment), or a stored event's kind
    data: Any = None
    id: int | None = None


class SSEDecoder:
    """Feed it lines without their line ending; it returns a `Message` when one is complete."""

    def __init__(self) -> None:
        self._event, self._data, self._id = "", [], None

    def feed(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return Message("ping") if "keep-alive" in line else None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and value.isdigit():
            self._id = int(value)
        return None  # `retry` and unknown fields: ignored

    def _dispatch(self) -> Message | None:
        event, data, id_ = self._event or "message", self._data, self._id
        self._event, self._data, self._id = "", [], None
        if not data:
            return None
        text = "\n".join(data)
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
        return Message(event, payload, id_)
