"""Uploads against a real API process: validated while they stream (peak memory bounded whatever the size),
a bound on uploads received at once, and a full disk answered with a named error that leaves nothing behind."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.core.db.migrate import upgrade
from service.core.db.session import session_scope
from service.http.auth import create_api_key
from tests.helpers.api_process import api_process, peak_rss_mb
from tests.helpers.small_disk import small_filesystem
from tests.service.conftest import BROKER_URL

LINE = json.dumps({"text": "All the world's a stage, and all the men and women merely players. " * 12}) + "\n"


def _start(tmp: Path, artifact_root: Path, **env_extra: str):
    url = f"sqlite:///{tmp / 'api.db'}"
    upgrade(url)
    with session_scope(url) as session:
        key = create_api_key(session, "up")[1]
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": url,
        "DISTILLERY_BROKER_URL": BROKER_URL,
        "DISTILLERY_ARTIFACT_ROOT": str(artifact_root),
        "DISTILLERY_MAX_UPLOAD_BYTES": str(1 << 30),
        **env_extra,
    }
    return api_process(env, tmp), {"Authorization": f"Bearer {key}"}


def _write(path: Path, megabytes: int, last: str = "") -> Path:
    with open(path, "w") as f:
        for _ in range(megabytes * 2**20 // len(LINE)):
            f.write(LINE)
        f.write(last)
    return path


def test_a_large_upload_is_validated_in_bounded_memory(tmp_path, redis_broker):
    big = _write(tmp_path / "big.jsonl", 160)
    bad = _write(tmp_path / "bad.jsonl", 40, last='{"text": 5}\n' + "x" * (17 << 20) + "\n")
    server, headers = _start(tmp_path, tmp_path / "artifacts")
    with server as (base, proc):
        before = peak_rss_mb(proc.pid)
        with open(big, "rb") as f:
            r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("big.jsonl", f)}, timeout=300)
        assert r.status_code == 201, r.text
        assert r.json()["records"] == 160 * 2**20 // len(LINE) and r.json()["format"] == "text"
        with open(bad, "rb") as f:
            r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("bad.jsonl", f)}, timeout=300)
        assert r.status_code == 422, r.text
        lines = 40 * 2**20 // len(LINE)
        assert [e["line"] for e in r.json()["errors"]] == [lines + 1, lines + 2]
        assert "longer than" in r.json()["errors"][1]["message"] and "bad.jsonl" in r.json()["detail"]
        rise = peak_rss_mb(proc.pid) - before
    # the whole file (160 MB) never sat in memory, nor a 17 MB line: 6.8 GB for 2 GB before this
    assert rise < 100, f"peak RSS rose {rise:.0f} MB"
    leftovers = [p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert len(leftovers) == 1 and leftovers[0].endswith(".jsonl")  # the good one; nothing of the bad one


def test_uploads_at_once_are_bounded(tmp_path, redis_broker):
    server, headers = _start(tmp_path, tmp_path / "artifacts", DISTILLERY_MAX_CONCURRENT_UPLOADS="1")
    release = threading.Event()

    def slow_body():
        boundary = b"slow"
        yield b'--slow\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        yield LINE.encode()
        release.wait(30)
        yield LINE.encode() + b"\r\n--" + boundary + b"--\r\n"

    with server as (base, _):
        first: dict = {}
        slow_headers = {**headers, "Content-Type": "multipart/form-data; boundary=slow"}
        sender = threading.Thread(
            target=lambda: first.setdefault(
                "r", httpx.post(f"{base}/v1/datasets", headers=slow_headers, content=slow_body(), timeout=60)
            )
        )
        sender.start()
        time.sleep(1.0)  # the first upload is being received
        r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("b.jsonl", LINE.encode())})
        assert r.status_code == 429 and r.headers["retry-after"].isdigit(), r.text
        assert r.headers["content-type"].startswith("application/problem+json") and "uploads" in r.json()["detail"]
        release.set()
        sender.join(30)
        assert first["r"].status_code == 201, first["r"].text
        r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("c.jsonl", LINE.encode())})
        assert r.status_code == 201, r.text


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path / "small", megabytes=12) as mount:
        yield mount


def test_an_upload_on_a_full_disk_is_a_named_507_and_leaves_nothing(tmp_path, redis_broker, small_disk):
    server, headers = _start(tmp_path, small_disk / "artifacts")
    big = _write(tmp_path / "big.jsonl", 20)
    with server as (base, _):
        with open(big, "rb") as f:
            r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("big.jsonl", f)}, timeout=60)
        assert r.status_code == 507, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["errors"] == [{"field": "file", "message": "no space left on the server's disk"}]
        assert not [p for p in (small_disk / "artifacts").rglob("*") if p.is_file()]
        # the space is back: a small upload goes through
        r = httpx.post(f"{base}/v1/datasets", headers=headers, files={"file": ("ok.jsonl", LINE.encode())})
        assert r.status_code == 201, r.text
