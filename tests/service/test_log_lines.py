"""A request cannot forge a log line: CR, LF, NUL (decoded from `%0d%0a`, `%00` in the path) and other control
characters (NEL in X-Forwarded-For, which the HTTP parser lets through) are escaped in every line the API
process writes, its own records and uvicorn's access lines alike."""

from __future__ import annotations

import io
import logging
import os
import socket

from service.http.logs import SafeFormatter, escape_controls
from tests.helpers.api_process import api_process
from tests.service.conftest import BROKER_URL

# the path decodes to "/v1/jobs/\r\nINFO:     forged line\x00"
HOSTILE_PATH = "/v1/jobs/%0d%0aINFO:%20%20%20%20%20forged%20line%00"
FORGED = "INFO:     forged"
RAW_CONTROLS = ("\r", "\x00", "\x85", "\x1b")


def assert_unforged(output: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in output, f"raw {char!r} in the log: {output[-3000:]!r}"
    assert not any(line.startswith(FORGED) for line in output.split("\n")), output[-3000:]


def test_escape_controls():
    assert escape_controls("a\r\nb\x00c\x1bd\x7fe\x85f\u2028g\th") == (
        "a\\x0d\\x0ab\\x00c\\x1bd\\x7fe\\x85f\\u2028g\\x09h"
    )
    assert escape_controls("line 1\nline 2\r", keep="\n") == "line 1\nline 2\\x0d"
    assert escape_controls("plain ünïcode / paths %0d") == "plain ünïcode / paths %0d"


def test_a_logged_request_path_stays_on_its_line(api, monkeypatch):
    """In process: the path an error handler logs, through the API process's formatter."""
    import service.http.auth as auth

    def broken(*_args):
        raise RuntimeError("a bug in the key lookup")

    monkeypatch.setattr(auth, "resolve_key", broken)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelprefix)s %(name)s: %(message)s", use_colors=False))
    logger = logging.getLogger("service")
    logger.addHandler(handler)
    try:
        r = api.client.get(HOSTILE_PATH, headers=api.headers)
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 500
    output = stream.getvalue()
    assert "unhandled error on GET /v1/jobs/\\x0d\\x0aINFO:     forged line\\x00" in output
    assert "RuntimeError: a bug in the key lookup" in output  # the traceback is kept, on its own lines
    assert_unforged(output)


def _send(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(4096)


def test_the_api_process_escapes_request_data_in_its_logs(tmp_path):
    """A real `distillery-server api`: its error line (a database without a schema makes the key lookup fail,
    so the path is logged) and its access line (the client address from X-Forwarded-For)."""
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": f"sqlite:///{tmp_path / 'unmigrated.db'}",
        "DISTILLERY_BROKER_URL": BROKER_URL,
        "DISTILLERY_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
    }
    with open(tmp_path / "access.log", "w") as access, api_process(env, tmp_path, stdout=access) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        reply = _send(
            port,
            (
                f"GET {HOSTILE_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer dst_abc_def\r\n"
            ).encode()
            + b"X-Forwarded-For: 10.0.0.7\xc2\x85INFO:     forged\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 500"), reply
    errors = proc.stderr.read()
    access_log = (tmp_path / "access.log").read_text()
    assert "unhandled error on GET /v1/jobs/\\x0d\\x0aINFO:     forged line\\x00" in errors, errors[-3000:]
    assert "\\x85INFO:     forged" in access_log, access_log  # NEL, escaped
    assert_unforged(errors)
    assert_unforged(access_log)
