"""Bearer keys: missing, malformed, unknown and revoked keys are 401 problems; projects never see each
other's objects (404, not 403); failed authentications past a burst are 429s per client address, without a key
lookup, while keys accepted before keep working."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from service.core.db.models import ApiKey
from service.http.auth import hash_key, revoke_api_key
from service.http.auth_limit import FailedAuthLimit
from service.http.problems import Problem
from tests.service.conftest import running_api
from tests.service.factories import insert_artifact, insert_job, register_model, upload_dataset

PROBLEM = "application/problem+json"


def assert_401(r) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.headers["www-authenticate"].lower().startswith("bearer")
    body = r.json()
    assert body["status"] == 401 and body["type"].endswith("unauthorized") and body["detail"]


def test_missing_malformed_unknown_and_revoked_keys_are_401(api):
    c = api.client
    assert_401(c.get("/v1/datasets"))
    assert_401(c.get("/v1/datasets", headers={"Authorization": api.key}))  # no scheme
    assert_401(c.get("/v1/datasets", headers={"Authorization": "Basic dXNlcjpwdw=="}))
    assert_401(c.get("/v1/datasets", headers={"Authorization": "Bearer nonsense"}))
    prefix = api.key.split("_")[1]
    assert_401(c.get("/v1/datasets", headers={"Authorization": f"Bearer dst_{prefix}_wrongsecret"}))
    assert_401(c.post("/v1/jobs", json={}))
    assert c.get("/v1/datasets", headers=api.headers).status_code == 200

    with api.db() as session:
        assert revoke_api_key(session, prefix) == 1
    assert_401(c.get("/v1/datasets", headers=api.headers))


def test_only_the_hash_of_a_key_is_stored(api):
    with api.db() as session:
        row = session.query(ApiKey).filter_by(project_id=api.project_id).one()
        assert row.key_hash == hash_key(api.key)
        assert api.key not in (row.key_hash, row.prefix)
        assert row.last_used_at is None
    api.client.get("/v1/models", headers=api.headers)
    with api.db() as session:
        assert session.query(ApiKey).filter_by(project_id=api.project_id).one().last_used_at is not None


def test_other_projects_objects_are_404(api):
    dataset = upload_dataset(api)
    model = register_model(api)
    job_id = insert_job(api)
    artifact_id = insert_artifact(api, job_id, b"weights")
    other, _ = api.other_project()
    c = api.client
    for path in (
        f"/v1/datasets/{dataset['id']}",
        f"/v1/models/{model['id']}",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/events",
        f"/v1/jobs/{job_id}/events/stream",
        f"/v1/jobs/{job_id}/metrics",
        f"/v1/jobs/{job_id}/checkpoints",
        f"/v1/jobs/{job_id}/artifacts",
        f"/v1/artifacts/{artifact_id}",
        f"/v1/artifacts/{artifact_id}/content",
    ):
        r = c.get(path, headers=other)
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
        assert c.get(path.replace("/stream", ""), headers=api.headers).status_code == 200, path
    assert c.delete(f"/v1/datasets/{dataset['id']}", headers=other).status_code == 404
    assert c.post(f"/v1/jobs/{job_id}/cancel", headers=other).status_code == 404
    # and lists are scoped
    assert c.get("/v1/datasets", headers=other).json() == {"data": [], "has_more": False}
    assert c.get("/v1/models", headers=other).json()["data"] == []
    assert c.get("/v1/jobs", headers=other).json()["data"] == []


def test_operations_routes_need_no_key(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/metrics").status_code == 200
    assert api.client.get("/schema/openapi.json").status_code == 200


# ------------------------------------------------------------------------------- failed-auth limit


def assert_429(r) -> int:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["type"].endswith("too-many-requests") and "failed authentications" in r.json()["detail"]
    return int(r.headers["retry-after"])


@contextmanager
def statements_run(engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def note(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", note)


def test_wrong_keys_are_limited_per_address(database_url, tmp_path, redis_broker):
    with running_api(database_url, tmp_path, redis_broker, auth_failure_burst=5, auth_failure_per_second=1) as api:
        c = api.client
        assert c.get("/v1/datasets", headers=api.headers).status_code == 200
        prefix = api.key.split("_")[1]
        wrong = {"Authorization": f"Bearer dst_{prefix}_wrongsecret"}
        for _ in range(5):
            assert_401(c.get("/v1/datasets", headers=wrong))
        wait = assert_429(c.get("/v1/datasets", headers=wrong))
        assert wait == 1
        assert_429(c.get("/v1/datasets"))  # no key at all: the same limit

        with statements_run(api.sessions.kw["bind"]) as statements:
            for _ in range(20):
                assert_429(c.get("/v1/datasets", headers=wrong))
        assert statements == [], "a limited address gets no key lookup"
        assert c.get("/v1/datasets", headers=api.headers).status_code == 200  # a key accepted before still works

        other, _ = api.other_project()  # never accepted yet: waits too
        assert_429(c.get("/v1/datasets", headers=other))
        time.sleep(wait)
        assert c.get("/v1/datasets", headers=other).status_code == 200
        assert_401(c.get("/v1/datasets", headers=wrong))  # the one refilled failure
        assert_429(c.get("/v1/datasets", headers=wrong))


def test_valid_keys_are_never_limited(database_url, tmp_path, redis_broker):
    with running_api(database_url, tmp_path, redis_broker, auth_failure_burst=2, auth_failure_per_second=1) as api:
        for _ in range(50):
            assert api.client.get("/v1/models", headers=api.headers).status_code == 200


def test_a_revoked_key_loses_its_pass(database_url, tmp_path, redis_broker):
    """A key accepted once and revoked since is limited like any wrong key after its first refusal."""
    with running_api(database_url, tmp_path, redis_broker, auth_failure_burst=2, auth_failure_per_second=0.1) as api:
        c = api.client
        assert c.get("/v1/models", headers=api.headers).status_code == 200
        with api.db() as session:
            revoke_api_key(session, api.key.split("_")[1])
        assert_401(c.get("/v1/models", headers=api.headers))
        assert_401(c.get("/v1/models", headers=api.headers))
        assert_429(c.get("/v1/models", headers=api.headers))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limit_is_a_token_bucket_per_address():
    clock = FakeClock()
    limit = FailedAuthLimit(burst=3, per_second=0.5, clock=clock)
    for _ in range(3):
        limit.check("10.0.0.1", None)
        limit.failed("10.0.0.1", None)
    with pytest.raises(Problem) as e:
        limit.check("10.0.0.1", None)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "2"}
    limit.check("10.0.0.2", None)  # another address has its own bucket
    clock.now += 1.0  # half a token: still refused, one more second to wait
    with pytest.raises(Problem) as e:
        limit.check("10.0.0.1", None)
    assert e.value.headers == {"Retry-After": "1"}
    clock.now += 1.0
    limit.check("10.0.0.1", None)
    limit.failed("10.0.0.1", None)
    with pytest.raises(Problem):
        limit.check("10.0.0.1", None)
    limit.accepted("hash-of-a-good-key")
    limit.check("10.0.0.1", "hash-of-a-good-key")  # vouched for, even from a limited address
    limit.failed("10.0.0.1", "hash-of-a-good-key")  # ...until it fails
    with pytest.raises(Problem):
        limit.check("10.0.0.1", "hash-of-a-good-key")
    clock.now += 3600  # refilled, but never past the burst
    for _ in range(3):
        limit.check("10.0.0.1", None)
        limit.failed("10.0.0.1", None)
    with pytest.raises(Problem):
        limit.check("10.0.0.1", None)


def test_the_limit_remembers_a_bounded_number_of_addresses(monkeypatch):
    import service.http.auth_limit as auth_limit

    monkeypatch.setattr(auth_limit, "MAX_ADDRESSES", 100)
    limit = FailedAuthLimit(burst=1, per_second=0.001)
    for i in range(1000):
        limit.failed(f"10.0.{i // 256}.{i % 256}", None)
    assert len(limit._buckets) == 100
    limit.check("10.0.0.0", None)  # the oldest was forgotten
    with pytest.raises(Problem):
        limit.check("10.0.3.231", None)  # the newest is still limited
