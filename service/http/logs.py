"""Log lines that a request cannot forge.

Request data reaches log lines: a path is percent-decoded (`%0d%0a` is CR LF, `%00` NUL) before a handler
logs it, and uvicorn's access line shows the client address from X-Forwarded-For as sent (a C1 control such
as NEL passes the parser). Rather than escaping at each call site, the formatters of the API process escape
every control character of a formatted line as `\\xNN` / `\\uNNNN`, so one record is always one line. A
traceback keeps its line breaks (its own structure); other control characters in it are escaped too.

`UVICORN_LOG_CONFIG` is uvicorn's own configuration with these formatters (colours off: they are control
characters too), plus a handler for the service's loggers, which uvicorn leaves unconfigured.
"""

from __future__ import annotations

import copy
import logging
import re
from types import TracebackType

from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import AccessFormatter, DefaultFormatter

# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with each control character (but those in `keep`) written as an escape: `\\r` reads `\\x0d`."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _CONTROL.sub(escape, text)


class _OneLinePerRecord(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        return escape_controls(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return escape_controls(super().formatStack(stack_info), keep="\n")


class SafeFormatter(_OneLinePerRecord, DefaultFormatter):
    """uvicorn's default formatter, control characters escaped."""


class SafeAccessFormatter(_OneLinePerRecord, AccessFormatter):
    """uvicorn's access-line formatter, control characters escaped."""


def _uvicorn_log_config() -> dict:
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"].update({"()": f"{__name__}.SafeFormatter", "use_colors": False})
    config["formatters"]["access"].update({"()": f"{__name__}.SafeAccessFormatter", "use_colors": False})
    config["formatters"]["service"] = {
        "()": f"{__name__}.SafeFormatter",
        "use_colors": False,
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["service"] = {
        "formatter": "service",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["service"] = {"level": "INFO"}
    config["root"] = {"handlers": ["service"], "level": "WARNING"}
    return config


UVICORN_LOG_CONFIG = _uvicorn_log_config()
