"""Artifact downloads: sha256 in headers, HTTP Range, and paths that must stay inside the artifact root."""

from __future__ import annotations

import base64
import hashlib

import pytest

from service.http.controllers.artifacts import parse_range
from tests.service.factories import insert_artifact, insert_job

CONTENT = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def artifact(api):
    job_id = insert_job(api, status="succeeded")
    return insert_artifact(api, job_id, CONTENT)


def get(api, artifact_id, **headers):
    return api.client.get(f"/v1/artifacts/{artifact_id}/content", headers={**api.headers, **headers})


def test_metadata_and_full_download(api, artifact):
    meta = api.client.get(f"/v1/artifacts/{artifact}", headers=api.headers).json()
    digest = hashlib.sha256(CONTENT)
    assert meta["sha256"] == digest.hexdigest() and meta["size_bytes"] == len(CONTENT)
    assert set(meta) == {"id", "job_id", "name", "size_bytes", "sha256", "content_type", "created_at"}
    r = get(api, artifact)
    assert r.status_code == 200 and r.content == CONTENT
    assert r.headers["x-content-sha256"] == digest.hexdigest()
    assert r.headers["digest"] == "sha-256=" + base64.b64encode(digest.digest()).decode()
    assert r.headers["accept-ranges"] == "bytes" and r.headers["etag"] == f'"{digest.hexdigest()}"'
    assert r.headers["content-length"] == str(len(CONTENT))
    assert 'filename="adapters.safetensors"' in r.headers["content-disposition"]


def test_ranges(api, artifact):
    r = get(api, artifact, Range="bytes=100-199")
    assert r.status_code == 206 and r.content == CONTENT[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(CONTENT)}" and r.headers["content-length"] == "100"
    assert r.headers["x-content-sha256"] == hashlib.sha256(CONTENT).hexdigest()  # of the whole file
    r = get(api, artifact, Range="bytes=10000-")
    assert r.status_code == 206 and r.content == CONTENT[10000:]
    r = get(api, artifact, Range="bytes=-40")
    assert r.status_code == 206 and r.content == CONTENT[-40:]
    r = get(api, artifact, Range="bytes=10200-99999")
    assert r.status_code == 206 and r.content == CONTENT[10200:]
    # resuming a download piece by piece gives the file back
    pieces = b"".join(get(api, artifact, Range=f"bytes={i}-{i + 4095}").content for i in range(0, len(CONTENT), 4096))
    assert pieces == CONTENT
    r = get(api, artifact, Range=f"bytes={len(CONTENT)}-")
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(CONTENT)}"
    assert r.headers["content-type"].startswith("application/problem+json")
    assert get(api, artifact, Range="bytes=-0").status_code == 416
    # numbers of any length: past the end is 416, an end past the end is clamped, a huge suffix is all of it
    huge = "9" * 5000
    assert get(api, artifact, Range=f"bytes={huge}-").status_code == 416
    r = get(api, artifact, Range=f"bytes=10-{huge}")
    assert r.status_code == 206 and r.content == CONTENT[10:]
    r = get(api, artifact, Range=f"bytes=-{huge}")
    assert r.status_code == 206 and r.content == CONTENT
    # malformed or multiple ranges: the whole file
    assert get(api, artifact, Range="bytes=0-1,5-6").status_code == 200
    assert get(api, artifact, Range="lines=1-2").status_code == 200
    # If-Range with another version's tag: the whole file
    r = get(api, artifact, Range="bytes=0-9", **{"If-Range": '"other"'})
    assert r.status_code == 200 and r.content == CONTENT
    r = get(api, artifact, Range="bytes=0-9", **{"If-Range": f'"{hashlib.sha256(CONTENT).hexdigest()}"'})
    assert r.status_code == 206 and r.content == CONTENT[:10]


def test_parse_range():
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=-30", 10) == (0, 9)
    assert parse_range("bytes=9-3", 10) is None
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=0-", 0) == "unsatisfiable"


def test_paths_outside_the_artifact_root_are_never_served(api, tmp_path):
    job_id = insert_job(api)
    outside = tmp_path / "secret.txt"
    escaped = insert_artifact(api, job_id, b"secret", path=outside)
    r = get(api, escaped)
    assert r.status_code == 404 and b"secret" not in r.content
    root = api.settings.artifact_root
    dotted = insert_artifact(api, job_id, b"x", path=root / "jobs" / ".." / ".." / "dotted.txt")
    assert get(api, dotted).status_code == 404
    link = root / "jobs" / "link.bin"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    with api.db() as session:
        from service.core.db.models import Artifact

        session.get(Artifact, escaped).path = str(link)
    assert get(api, escaped).status_code == 404
    missing = insert_artifact(api, job_id, b"gone", name="gone.bin")
    with api.db() as session:
        from pathlib import Path

        from service.core.db.models import Artifact

        Path(session.get(Artifact, missing).path).unlink()
    assert get(api, missing).status_code == 404
    assert get(api, "art_missing").status_code == 404
