"""Dataset uploads: streamed to disk, hashed, validated line by line; bad uploads leave nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.core.db.models import Dataset, IdempotencyRecord
from tests.service.conftest import MAX_UPLOAD
from tests.service.factories import TEXT_JSONL, count, insert_job, upload_dataset

PROBLEM = "application/problem+json"


def stored_files(api) -> list[Path]:
    root = Path(api.settings.artifact_root) / "datasets"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_nothing_written(api) -> None:
    assert count(api, Dataset) == 0
    assert stored_files(api) == []


def test_upload_stores_validated_file_under_its_id(api):
    body = upload_dataset(api, name="hamlet lines")
    assert body["name"] == "hamlet lines"
    assert body["format"] == "text" and body["records"] == 2
    assert body["size_bytes"] == len(TEXT_JSONL)
    assert body["sha256"] == hashlib.sha256(TEXT_JSONL).hexdigest()
    assert body["id"].startswith("ds_") and body["created_at"].endswith("Z")
    [path] = stored_files(api)
    assert path.name == f"{body['id']}.jsonl" and path.read_bytes() == TEXT_JSONL
    assert api.client.get(f"/v1/datasets/{body['id']}", headers=api.headers).json() == body


def test_stated_format_and_detected_formats(api):
    chat = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    assert upload_dataset(api, chat)["format"] == "chat"
    mcq = b'{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n'
    assert upload_dataset(api, mcq, format="mcq")["format"] == "mcq"
    r = api.client.post(
        "/v1/datasets", headers=api.headers, files={"file": ("a.jsonl", TEXT_JSONL)}, data={"format": "completions"}
    )
    assert r.status_code == 422
    assert r.json()["errors"][0]["line"] == 1
    r = api.client.post(
        "/v1/datasets", headers=api.headers, files={"file": ("a.jsonl", TEXT_JSONL)}, data={"format": "parquet"}
    )
    assert r.status_code == 422 and r.json()["errors"] == [
        {"field": "format", "message": r.json()["errors"][0]["message"]}
    ]


def test_bad_jsonl_names_the_line_and_leaves_nothing(api):
    content = b'{"text": "ok"}\n{"text": "ok"}\n{"text": \n{"txt": "typo"}\n'
    r = api.client.post("/v1/datasets", headers=api.headers, files={"file": ("plays.jsonl", content)})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert [e["line"] for e in body["errors"]] == [3, 4]
    assert "plays.jsonl:3" in body["detail"] and "invalid JSON" in body["detail"]
    assert ".upload-" not in body["detail"]
    assert_nothing_written(api)


def test_empty_file_is_rejected(api):
    r = api.client.post("/v1/datasets", headers=api.headers, files={"file": ("e.jsonl", b"\n\n")})
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    assert_nothing_written(api)


def test_oversized_upload_is_413_and_leaves_nothing(api):
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'
    content = line * (MAX_UPLOAD // len(line) + 2)
    r = api.client.post("/v1/datasets", headers=api.headers, files={"file": ("big.jsonl", content)})
    assert r.status_code == 413
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["errors"][0]["field"] == "file"
    assert_nothing_written(api)


def test_file_names_never_reach_the_filesystem(api):
    r = api.client.post("/v1/datasets", headers=api.headers, files={"file": ("../../../../etc/evil.jsonl", TEXT_JSONL)})
    assert r.status_code == 201
    body = r.json()
    assert body["name"] == "evil.jsonl"  # only the base name, as a label
    [path] = stored_files(api)
    assert path.name == f"{body['id']}.jsonl"
    assert not (Path(api.settings.artifact_root).parent / "etc").exists()


def test_path_like_names_are_rejected(api):
    for name in ("../../etc/passwd", "a/b", "..", "x\x00y", "", "n" * 201):
        r = api.client.post(
            "/v1/datasets", headers=api.headers, files={"file": ("a.jsonl", TEXT_JSONL)}, data={"name": name}
        )
        if name == "":  # an empty name means "no name": the file name is used
            assert r.status_code == 201
            continue
        assert r.status_code == 422, (name, r.text)
        assert r.json()["errors"][0]["field"] == "name"
    assert count(api, Dataset) == 1 and len(stored_files(api)) == 1


def test_malformed_requests(api):
    c = api.client
    r = c.post("/v1/datasets", headers=api.headers, json={"file": "x"})
    assert r.status_code == 415 and r.headers["content-type"].startswith(PROBLEM)
    r = c.post("/v1/datasets", headers=api.headers, data={"name": "no file"}, files={"other": ("a", b"x")})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "other"
    r = c.post("/v1/datasets", headers=api.headers, data={"name": "no file"})
    assert r.status_code in (415, 422)  # a form without files is urlencoded
    r = c.post(
        "/v1/datasets",
        headers={**api.headers, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\ntrunc',
    )
    assert r.status_code == 400 and "multipart" in r.json()["detail"]
    assert_nothing_written(api)


def test_list_pages_with_a_cursor(api):
    ids = [upload_dataset(api, name=f"set {i}")["id"] for i in range(5)]
    c = api.client
    first = c.get("/v1/datasets?limit=2", headers=api.headers).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = c.get(f"/v1/datasets?limit=2&after={first['data'][-1]['id']}", headers=api.headers).json()
    assert [d["id"] for d in second["data"]] == ids[::-1][2:4] and second["has_more"] is True
    third = c.get(f"/v1/datasets?limit=2&after={second['data'][-1]['id']}", headers=api.headers).json()
    assert [d["id"] for d in third["data"]] == ids[:1] and third["has_more"] is False
    r = c.get("/v1/datasets?limit=0", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "limit"
    r = c.get("/v1/datasets?limit=abc", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "limit"


def test_delete_is_soft_and_refused_while_a_job_uses_it(api):
    ds = upload_dataset(api)
    job_id = insert_job(api, status="running", kind="teacher_cache", spec={"teacher": "mdl_x", "data": ds["id"]})
    c = api.client
    r = c.delete(f"/v1/datasets/{ds['id']}", headers=api.headers)
    assert r.status_code == 409 and job_id in r.json()["detail"]
    with api.db() as session:
        session.get(type(session.get(Dataset, ds["id"])), ds["id"])
        from service.core import lifecycle

        lifecycle.finish(session, job_id, None, "succeeded")
    assert c.delete(f"/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204
    assert c.get(f"/v1/datasets/{ds['id']}", headers=api.headers).status_code == 404
    assert c.get("/v1/datasets", headers=api.headers).json()["data"] == []
    assert c.delete(f"/v1/datasets/{ds['id']}", headers=api.headers).status_code == 404
    with api.db() as session:
        assert session.get(Dataset, ds["id"]).deleted_at is not None


def test_idempotent_upload(api):
    c = api.client
    h = {**api.headers, "Idempotency-Key": "upload-1"}
    a = c.post("/v1/datasets", headers=h, files={"file": ("a.jsonl", TEXT_JSONL)}, data={"name": "a"})
    b = c.post("/v1/datasets", headers=h, files={"file": ("a.jsonl", TEXT_JSONL)}, data={"name": "a"})
    assert a.status_code == b.status_code == 201
    assert a.json() == b.json() and b.headers["idempotent-replayed"] == "true"
    assert count(api, Dataset) == 1 and len(stored_files(api)) == 1
    r = c.post("/v1/datasets", headers=h, files={"file": ("a.jsonl", TEXT_JSONL + b'{"text": "more"}\n')})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Idempotency-Key"
    assert count(api, Dataset) == 1 and len(stored_files(api)) == 1 and count(api, IdempotencyRecord) == 1
