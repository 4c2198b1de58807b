"""Dataset records: the formats a dataset file may have, the fields of each, and the validation of JSONL files
line by line, exactly as the API checks an upload and the worker checks what it trains on.

Pure Python (no numpy, no MLX). A dataset is a JSONL file, one JSON object per line (blank lines are skipped),
all records of one format:

    text         {"text": str}
    completions  {"prompt": str, "completion": str}
    chat         {"messages": [{"role", "content"}, ...], "tools"?: [...]}   (as mlx-lm)
    preference   {"prompt": str, "chosen": str, "rejected": str, "subject"?: str}  (benchmarks only)
    mcq          {"question": str, "choices": [str, ...], "answer": int, "subject"?: str}  (benchmarks only)
    prompts      {"prompt": str | [{"role", "content"}, ...]}  (teacher_mode: on_policy only: the student writes
                 the completions; a list of messages is a conversation the chat template renders with the
                 generation prompt)

The format is stated, or detected from the first record that looks like one. `JsonlChecker` validates bytes as
they arrive; a bad file raises `DatasetError` with every problem (up to `MAX_REPORTED_ERRORS`) as
`name:line: problem`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args


class DatasetError(ValueError):
    """A dataset file is invalid: the message says what is wrong and where (`name:line: problem`, one per line).
    A job that meets one fails with `error.code = "user_error"`; an upload is refused with a 422."""


DatasetFormat = Literal["text", "completions", "chat", "preference", "mcq", "prompts"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)
TRAINABLE_FORMATS: tuple[str, ...] = ("text", "completions", "chat")  # preference and mcq are for benchmarks
# what on-policy distillation samples from (the prompts of completions and chat, or prompts alone)
PROMPT_FORMATS: tuple[str, ...] = ("completions", "chat", "prompts")

# Required and optional fields of each format, in the order they are named in messages.
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "completions": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "mcq": ("question", "choices", "answer"),
    "prompts": ("prompt",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "text": (),
    "completions": (),
    "chat": ("tools",),  # passed to the chat template, as mlx-lm does
    "preference": ("subject",),  # results are reported per subject, as mcq's are
    "mcq": ("subject",),
    "prompts": (),
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
MESSAGE_OPTIONAL = ("name", "tool_calls", "tool_call_id")

MAX_REPORTED_ERRORS = 10
MAX_LINE_BYTES = 16 << 20  # one record; a longer line is reported, never held whole in memory


def detect_format(record: dict) -> str | None:
    """The format a record *looks like*, from its distinguishing fields; None if it matches none.

    Deliberately lenient (a "completion" without a "prompt" looks like `completions`): validation then reports
    precisely what is missing, which is a better message than "unknown format". A lone "prompt" is `prompts`.
    """
    keys = set(record) if isinstance(record, Mapping) else set()
    if "messages" in keys:
        return "chat"
    if keys & {"question", "choices", "answer"}:
        return "mcq"
    if keys & {"chosen", "rejected"}:
        return "preference"
    if keys == {"prompt"}:
        return "prompts"
    if keys & {"prompt", "completion"}:
        return "completions"
    if "text" in keys:
        return "text"
    return None


class JsonlChecker:
    """Validates JSONL as its bytes arrive, a line at a time, so a file of any size is checked in bounded
    memory (an upload is checked while it streams in). `keep=True` also keeps the records.

    `close()` raises DatasetError with the report (`name:line: problem` per bad line) or returns the format."""

    def __init__(self, name: str, format: str | None = None, *, keep: bool = False) -> None:
        if format is not None and format not in FORMATS:
            raise DatasetError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
        self.name = name
        self.stated = format
        self.format = format
        self.keep = keep
        self.records: list[dict] = []
        self.lines: list[int] = []
        self.count = 0
        self._origin = "as stated"
        self._errors: list[str] = []
        self._error_count = 0
        self._digest = hashlib.sha256()
        self._partial = bytearray()
        self._skipping = False  # inside a line already reported as too long
        self._lineno = 0
        self._started = False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def feed(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        if not self._started:
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
                chunk = chunk[3:]
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._take_partial(chunk[start:])
                return
            self._take_partial(chunk[start:end])
            self._end_line()
            start = end + 1

    def feed_file(self, path: Path, block: int = 1 << 20) -> None:
        with open(path, "rb") as f:
            while piece := f.read(block):
                self.feed(piece)

    def close(self) -> str:
        """The format, once every line is valid; else DatasetError with the report."""
        if self._partial or self._skipping:
            self._end_line()
        if self._errors:
            raise DatasetError(_error_report(self.name, self._errors, self._error_count))
        if not self.count or self.format is None:
            raise DatasetError(f"{self.name}: file is empty (no records)")
        return self.format

    def _take_partial(self, piece: bytes) -> None:
        if self._skipping:
            return
        if len(self._partial) + len(piece) > MAX_LINE_BYTES:
            self._skipping = True
            self._partial.clear()
            return
        self._partial += piece

    def _end_line(self) -> None:
        self._lineno += 1
        lineno = self._lineno
        if self._skipping:
            self._skipping = False
            self._error(lineno, f"line is longer than {MAX_LINE_BYTES} bytes")
            return
        raw = bytes(self._partial)
        self._partial.clear()
        record, problem = _parse_line(raw)
        if record is None:
            if problem is not None:
                self._error(lineno, problem)
            return  # else a blank line
        if problem is None:
            looks = detect_format(record)
            if self.format is None and looks is not None:
                self.format, self._origin = looks, f"from line {lineno}"
            problem = _check_record(record, looks, self.format, self._origin)
        if problem is not None:
            self._error(lineno, problem)
            return
        self.count += 1
        if self.keep:
            self.records.append(record)
            self.lines.append(lineno)

    def _error(self, lineno: int, problem: str) -> None:
        self._error_count += 1
        if len(self._errors) < MAX_REPORTED_ERRORS:
            self._errors.append(f"{self.name}:{lineno}: {problem}")


def _parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """(record, None), (None, problem), or (None, None) for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if not text.strip():
        return None, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_json_type(value)}"
    return value, None


def _check_record(record: dict, looks: str | None, fmt: str | None, fmt_origin: str) -> str | None:
    """The first problem with a record in a file of format `fmt`, or None if it is valid."""
    if fmt is None:
        known = "; ".join(f"{f} {_fields(REQUIRED[f])}" for f in FORMATS)
        return f"record has fields {_fields(sorted(record))}, which match no format ({known})"
    if looks is None:
        return f"record has fields {_fields(sorted(record))} but format {fmt!r} needs {_fields(REQUIRED[fmt])}"
    if looks == "prompts" and fmt == "completions":
        looks = fmt  # a completion left out: say that it is missing (below)
    if looks != fmt:
        return f"record looks like {looks!r} but the file is {fmt!r} ({fmt_origin})"
    missing = [k for k in REQUIRED[fmt] if k not in record]
    if missing:
        return f"record has fields {_fields(sorted(record))} but format {fmt!r} needs {_fields(REQUIRED[fmt])}"
    extra = sorted(set(record) - set(REQUIRED[fmt]) - set(OPTIONAL[fmt]))
    if extra:
        allowed = _fields(REQUIRED[fmt] + OPTIONAL[fmt])
        return f"unknown field{'s' if len(extra) > 1 else ''} {_fields(extra)} for format {fmt!r} (allowed: {allowed})"
    return _VALIDATORS[fmt](record)


def _check_text(r: dict) -> str | None:
    return _nonempty_string(r, "text")


def _check_completions(r: dict) -> str | None:
    return _nonempty_string(r, "prompt") or _nonempty_string(r, "completion")


def _check_prompts(r: dict) -> str | None:
    prompt = r["prompt"]
    if not isinstance(prompt, list):
        return _nonempty_string(r, "prompt")
    if not prompt:
        return "field 'prompt' must be a non-empty string or a non-empty list of messages"
    for i, m in enumerate(prompt):
        if problem := _check_message(m):
            return f"prompt[{i}]: {problem}"
    return None


def _check_preference(r: dict) -> str | None:
    problem = _nonempty_string(r, "prompt") or _nonempty_string(r, "chosen") or _nonempty_string(r, "rejected")
    if problem is None and r["chosen"] == r["rejected"]:
        problem = "'chosen' and 'rejected' are identical"
    return problem or _check_subject(r)


def _check_mcq(r: dict) -> str | None:
    if problem := _nonempty_string(r, "question"):
        return problem
    choices, answer = r["choices"], r["answer"]
    if not isinstance(choices, list):
        return f"field 'choices' must be a list of strings, got {_json_type(choices)}"
    if len(choices) < 2:
        return f"field 'choices' needs at least 2 choices, got {len(choices)}"
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            return f"choices[{i}] must be a non-empty string"
    if not isinstance(answer, int) or isinstance(answer, bool):
        return f"field 'answer' must be an integer index into 'choices', got {_json_type(answer)}"
    if not 0 <= answer < len(choices):
        return f"field 'answer' is {answer}, out of range for {len(choices)} choices (0..{len(choices) - 1})"
    return _check_subject(r)


def _check_subject(r: dict) -> str | None:
    if "subject" in r and not isinstance(r["subject"], str):
        return f"field 'subject' must be a string, got {_json_type(r['subject'])}"
    return None


def _check_chat(r: dict) -> str | None:
    messages = r["messages"]
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of messages"
    if "tools" in r and not isinstance(r["tools"], list):
        return f"field 'tools' must be a list, got {_json_type(r['tools'])}"
    for i, m in enumerate(messages):
        if problem := _check_message(m):
            return f"messages[{i}]: {problem}"
    if not any(m["role"] == "assistant" for m in messages):
        return "chat has no assistant message (nothing to train on)"
    return None


def _check_message(m: object) -> str | None:
    if not isinstance(m, dict):
        return f"must be an object with 'role' and 'content', got {_json_type(m)}"
    missing = [k for k in ("role", "content") if k not in m]
    if missing:
        return f"missing {_fields(missing)}"
    extra = sorted(set(m) - {"role", "content", *MESSAGE_OPTIONAL})
    if extra:
        return f"unknown field{'s' if len(extra) > 1 else ''} {_fields(extra)}"
    if m["role"] not in CHAT_ROLES:
        return f"role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}"
    content_ok = isinstance(m["content"], str) or (m["content"] is None and "tool_calls" in m)
    if not content_ok:
        return f"'content' must be a string, got {_json_type(m['content'])}"
    return None


_VALIDATORS = {
    "text": _check_text,
    "completions": _check_completions,
    "chat": _check_chat,
    "preference": _check_preference,
    "mcq": _check_mcq,
    "prompts": _check_prompts,
}


def _nonempty_string(r: dict, key: str) -> str | None:
    v = r[key]
    if not isinstance(v, str):
        return f"field {key!r} must be a string, got {_json_type(v)}"
    if not v.strip():
        return f"field {key!r} is empty"
    return None


def _fields(names: Sequence[str]) -> str:
    """{'a', 'b'} in the given order (a set's repr would be in hash order and flaky in messages)."""
    return "{" + ", ".join(repr(n) for n in names) + "}"


def _json_type(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )


def _error_report(name: str, errors: list[str], total: int) -> str:
    """One error alone, or a summary line then the first `MAX_REPORTED_ERRORS` errors (of `total`)."""
    if total == 1:
        return errors[0]
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f", showing the first {len(shown)}" if total > len(shown) else ""
    return f"{name}: {total} invalid lines{more}:\n" + "\n".join(shown)
