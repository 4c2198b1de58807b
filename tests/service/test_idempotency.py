"""Idempotency-Key at the HTTP edge (service.http.idempotency): the response's record is committed with what the
request created, so a concurrent duplicate, or a commit that fails, never leaves one without the other; and the
transaction helpers the services rely on (service.core.transaction)."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from service.core import transaction
from service.core.db.models import Dataset, IdempotencyRecord, Job, Model
from service.core.errors import Conflict, Invalid, InvalidDataset, InvalidFields, NotFound, TooMany
from service.http import idempotency
from service.http.problems import problem_for
from tests.service.factories import TEXT_JSONL, count, setup_distill
from tests.service.test_datasets import stored_files


def lose_the_race(monkeypatch):
    """The next request's lookup misses the record, as when a concurrent request with the same key has not
    committed yet: it runs the handler, and its commit is the one that finds the key taken."""
    real = idempotency.find
    calls = []

    def find(session, project_id, idem):
        calls.append(idem.key)
        return None if len(calls) == 1 else real(session, project_id, idem)

    monkeypatch.setattr(idempotency, "find", find)
    return calls


def test_a_concurrent_duplicate_upload_replays_the_first_and_leaves_no_file(api, monkeypatch):
    h = {**api.headers, "Idempotency-Key": "race-1"}
    files = {"file": ("a.jsonl", TEXT_JSONL)}
    first = api.client.post("/v1/datasets", headers=h, files=files)
    assert first.status_code == 201
    calls = lose_the_race(monkeypatch)
    second = api.client.post("/v1/datasets", headers=h, files=files)
    assert calls == ["race-1", "race-1"]  # looked up before, and again after the failed commit
    assert second.status_code == 201 and second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    # the loser's dataset row was rolled back and the file it had moved into place removed
    assert count(api, Dataset) == 1 and len(stored_files(api)) == 1 and count(api, IdempotencyRecord) == 1


def test_a_concurrent_duplicate_job_is_created_and_sent_once(api, monkeypatch):
    spec = setup_distill(api)
    h = {**api.headers, "Idempotency-Key": "race-2"}
    body = {"kind": "distill", "spec": {**spec, "teacher_mode": "online"}}
    first = api.client.post("/v1/jobs", headers=h, json=body)
    assert first.status_code == 201 and api.queue_length() == 1
    lose_the_race(monkeypatch)
    second = api.client.post("/v1/jobs", headers=h, json=body)
    assert second.status_code == 201 and second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert count(api, Job) == 1 and api.queue_length() == 1  # the loser's job never reached the broker


def test_a_concurrent_request_with_another_body_is_refused(api, monkeypatch):
    h = {**api.headers, "Idempotency-Key": "race-3"}
    assert api.client.post("/v1/datasets", headers=h, files={"file": ("a.jsonl", TEXT_JSONL)}).status_code == 201
    lose_the_race(monkeypatch)
    other = api.client.post("/v1/datasets", headers=h, files={"file": ("b.jsonl", TEXT_JSONL)})
    assert other.status_code == 422 and other.json()["type"].endswith(":idempotency-key-reused")
    assert count(api, Dataset) == 1 and len(stored_files(api)) == 1


def test_a_failed_commit_leaves_neither_the_object_nor_its_record(api, monkeypatch):
    def lost(session):
        session.rollback()
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    real_commit = transaction.commit

    def commit(session):
        monkeypatch.setattr(session, "commit", lambda: lost(session))
        real_commit(session)

    monkeypatch.setattr(transaction, "commit", commit)
    h = {**api.headers, "Idempotency-Key": "crash-1"}
    r = api.client.post("/v1/models", headers=h, files={"file": ("m.gguf", b"GGUF" + b"\0" * 60)})
    assert r.status_code == 503
    monkeypatch.undo()
    assert count(api, Model) == 0 and count(api, IdempotencyRecord) == 0
    assert not [p for p in (api.settings.artifact_root / "models").rglob("*") if p.is_file()]
    # the retry with the same key creates it, once
    again = api.client.post("/v1/models", headers=h, files={"file": ("m.gguf", b"GGUF" + b"\0" * 60)})
    assert again.status_code == 201 and "idempotent-replayed" not in again.headers
    assert count(api, Model) == 1 and count(api, IdempotencyRecord) == 1


def test_a_refused_request_records_nothing(api):
    h = {**api.headers, "Idempotency-Key": "refused-1"}
    r = api.client.post("/v1/models", headers=h, json={"path": "/not/a/model"})
    assert r.status_code == 422
    assert count(api, IdempotencyRecord) == 0


# --------------------------------------------------------------------------------------- transaction


class FakeSession:
    def __init__(self, fail: bool = False) -> None:
        self.info: dict = {}
        self.fail = fail
        self.log: list[str] = []

    def commit(self) -> None:
        if self.fail:
            raise RuntimeError("commit failed")
        self.log.append("commit")

    def rollback(self) -> None:
        self.log.append("rollback")


def test_after_commit_actions_run_in_order_once_committed():
    session = FakeSession()
    transaction.after_commit(session, lambda: session.log.append("first"))
    transaction.after_commit(session, lambda: session.log.append("second"))
    transaction.undo(session, lambda: session.log.append("undone"))
    transaction.commit(session)
    transaction.commit(session)  # the actions ran with the first commit
    assert session.log == ["commit", "first", "second", "commit"]


def test_a_failed_commit_rolls_back_and_undoes_last_first():
    session = FakeSession(fail=True)
    transaction.after_commit(session, lambda: session.log.append("sent"))
    transaction.undo(session, lambda: session.log.append("undo 1"))
    transaction.undo(session, lambda: session.log.append("undo 2"))
    with pytest.raises(RuntimeError):
        transaction.commit(session)
    transaction.abandon(session)  # nothing left to undo
    assert session.log == ["rollback", "undo 2", "undo 1", "rollback"]


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "status", "slug", "title"),
    [
        (NotFound("job", "job_x"), 404, "not-found", "Not found"),
        (Conflict("job job_x already succeeded"), 409, "conflict", "Conflict"),
        (Invalid("name", "too long"), 422, "validation-error", "Validation failed"),
        (
            InvalidFields([{"field": "a", "message": "x"}, {"field": "b", "message": "y"}]),
            422,
            "validation-error",
            None,
        ),
        (InvalidDataset("bad", [{"line": 2, "message": "not JSON"}]), 422, "invalid-dataset", "Invalid dataset"),
        (TooMany("busy", 5, code="too-many-streams", title="Too many event streams"), 429, "too-many-streams", None),
    ],
)
def test_domain_errors_map_to_problems(error, status, slug, title):
    problem = problem_for(error)
    body = problem.body()
    assert body["status"] == status and body["type"] == f"urn:distillery:problem:{slug}"
    assert title is None or body["title"] == title
    assert body["detail"] == error.detail and body["errors"] == error.errors
    assert problem.headers == ({"Retry-After": "5"} if isinstance(error, TooMany) else {})


def test_field_errors_are_described_together():
    error = InvalidFields([{"field": "spec.data.train", "message": "unknown"}, {"line": 3, "message": "bad"}])
    assert error.detail == "spec.data.train: unknown; bad"
    assert Invalid("name", "too long").detail == "name: too long"
    assert NotFound("dataset", "ds_1").detail == "dataset 'ds_1' not found"
