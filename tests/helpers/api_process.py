"""`distillery-server api` as a real process, for tests that need a socket, its own memory or its signals."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.helpers.services import free_port

SERVER = str(Path(sys.executable).parent / "distillery-server")


def healthy(base: str, timeout: float) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=timeout).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def api_process(
    env: dict[str, str], cwd: Path, stdout: IO | int = subprocess.DEVNULL
) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of a started API; on exit SIGTERM must stop it within 10 s. Its stderr is a pipe,
    its stdout (the access log) goes to `stdout`."""
    port = free_port()
    proc = subprocess.Popen(
        [SERVER, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not healthy(base, 1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the API did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    try:
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the API did not stop on SIGTERM")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/status")
