"""Bearer keys: missing, malformed, unknown and revoked keys are 401 problems; projects never see each
other's objects (404, not 403)."""

from __future__ import annotations

from service.api.auth import hash_key, revoke_api_key
from service.db.models import ApiKey
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
    assert_401(c.get("/v1/datasets", headers={"Authorization": api.key}))               # no scheme
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
    for path in (f"/v1/datasets/{dataset['id']}", f"/v1/models/{model['id']}", f"/v1/jobs/{job_id}",
                 f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/events/stream", f"/v1/jobs/{job_id}/metrics",
                 f"/v1/jobs/{job_id}/checkpoints", f"/v1/jobs/{job_id}/artifacts", f"/v1/artifacts/{artifact_id}",
                 f"/v1/artifacts/{artifact_id}/content"):
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
