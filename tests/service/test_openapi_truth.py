"""The OpenAPI document tells the truth about errors and enums: each operation lists the problem statuses it can
answer (all `application/problem+json` with one shared `Problem` schema), and job statuses and kinds are
enums of the real values. The expectations are written out here, not read from service.http.openapi's table, so
a change to that table has to be a change to these tests too (one test checks the table itself: each cause in
it applies to some operation). That the app answers nothing else is the fuzz's job: tests/service/test_fuzz.py
checks every status it sees against this document.

The document does not depend on the database, so these tests run on SQLite only.
"""

from __future__ import annotations

import jsonschema
import pytest

from service.core import lifecycle
from service.http.openapi import PROBLEM_RESPONSES, document_routes

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

PROBLEM = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

UPLOADS = {("post", "/v1/datasets"), ("post", "/v1/models")}
JOB_CREATE = ("post", "/v1/jobs")
JOB_ESTIMATE = ("post", "/v1/jobs/estimate")  # the same body as JOB_CREATE, read the same way
EVENT_STREAM = ("get", "/v1/jobs/{job_id}/events/stream")
DOWNLOAD = ("get", "/v1/artifacts/{artifact_id}/content")
METRICS = ("get", "/metrics")
CONFLICTS = {
    ("delete", "/v1/datasets/{dataset_id}"),
    ("post", "/v1/jobs/{job_id}/cancel"),
    ("delete", "/v1/jobs/{job_id}/files"),
}


@pytest.fixture
def document(api) -> dict:
    r = api.client.get("/schema/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(document: dict) -> dict[tuple[str, str], dict]:
    return {
        (method, path): op
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    }


def problem_statuses(operation: dict) -> set[int]:
    return {int(s) for s in operation["responses"] if s.startswith(("4", "5"))}


def test_every_problem_response_is_problem_json_with_the_shared_schema(document):
    for key, op in operations(document).items():
        for status in problem_statuses(op):
            response = op["responses"][str(status)]
            assert response["content"] == {PROBLEM: {"schema": PROBLEM_REF}}, (key, status)
            assert response["description"], (key, status)
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "errors"}
    assert problem["properties"]["status"]["type"] == "integer"
    assert problem["properties"]["errors"]["items"] == {"$ref": "#/components/schemas/ProblemError"}
    entry = document["components"]["schemas"]["ProblemError"]
    assert set(entry["properties"]) == {"field", "line", "message"} and entry["required"] == ["message"]
    assert entry["anyOf"] == [{"required": ["field"]}, {"required": ["line"]}]


def test_real_problems_match_the_problem_schema(api, document):
    problem = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Problem", **document})
    answers = [
        api.client.get("/v1/jobs"),  # 401
        api.client.get("/v1/jobs/job_missing", headers=api.headers),  # 404
        api.client.get("/v1/jobs?limit=0", headers=api.headers),  # 422, a field
        api.client.post("/v1/jobs", headers=api.headers, content=b"{"),  # 415
        api.client.post("/v1/jobs", headers={**api.headers, "content-type": "application/json"}, content=b"{"),
        api.client.post("/v1/datasets", headers=api.headers, files={"file": ("d.jsonl", b"not json\n")}),
    ]
    assert [r.status_code for r in answers] == [401, 404, 422, 415, 400, 422]
    assert answers[-1].json()["errors"][0]["line"] == 1  # a dataset line
    for r in answers:
        assert r.headers["content-type"].startswith(PROBLEM)
        problem.validate(r.json())


def test_the_frameworks_own_error_shape_is_gone(document):
    """Litestar documents a 400 `{status_code, detail, extra}` as application/json on every operation with
    parameters; the API never sends it."""
    for key, op in operations(document).items():
        for status in problem_statuses(op):
            assert "application/json" not in op["responses"][str(status)]["content"], (key, status)
    assert problem_statuses(operations(document)[("get", "/v1/jobs")]) & {400} == set()


def test_each_operation_lists_the_problems_it_can_answer(document):
    ops = operations(document)
    for key, op in ops.items():
        method, path = key
        statuses = problem_statuses(op)
        if path.startswith("/v1/"):
            # every /v1 route: the bearer key (and the failed-authentication limit), validation of its
            # parameters or body, the database
            assert {401, 422, 429, 503} <= statuses, key
        else:
            assert not statuses & {404, 422}, key
        assert (404 in statuses) == ("{" in path), key
        assert (400 in statuses) == ("requestBody" in op), key  # a body that is not JSON / multipart
        assert (409 in statuses) == (key in CONFLICTS), key
        assert (413 in statuses) == (key in UPLOADS | {JOB_CREATE, JOB_ESTIMATE}), key
        assert (415 in statuses) == (key in UPLOADS | {JOB_CREATE, JOB_ESTIMATE}), key
        assert (416 in statuses) == (key == DOWNLOAD), key
        assert (507 in statuses) == (key in UPLOADS), key
    assert problem_statuses(ops[("get", "/readyz")]) == {503}
    assert problem_statuses(ops[("get", "/healthz")]) == set()
    assert problem_statuses(ops[METRICS]) == {401, 429}  # a wrong metrics token, and its limit
    assert problem_statuses(ops[("post", "/v1/datasets")]) == {400, 401, 413, 415, 422, 429, 503, 507}
    assert problem_statuses(ops[JOB_CREATE]) == {400, 401, 413, 415, 422, 429, 503}
    assert problem_statuses(ops[JOB_ESTIMATE]) == {400, 401, 413, 415, 422, 429, 503}
    assert problem_statuses(ops[EVENT_STREAM]) == {401, 404, 422, 429, 503}


def test_a_status_with_several_causes_names_each(document):
    ops = operations(document)
    stream_429 = ops[EVENT_STREAM]["responses"]["429"]["description"]
    upload_429 = ops[("post", "/v1/datasets")]["responses"]["429"]["description"]
    assert "failed authentications" in stream_429 and "event streams" in stream_429
    assert "failed authentications" in upload_429 and "uploads" in upload_429
    assert "event streams" not in upload_429


def test_every_cause_in_the_table_applies_to_some_operation(api):
    """A cause whose route was renamed or removed would silently document nothing."""
    routes = document_routes(api.client.app)
    for rule in PROBLEM_RESPONSES:
        assert any(rule.where(route) for route in routes), (rule.status, rule.description)


def test_problem_responses_document_their_headers(document):
    ops = operations(document)
    assert "WWW-Authenticate" in ops[("get", "/v1/jobs")]["responses"]["401"]["headers"]
    assert "Retry-After" in ops[EVENT_STREAM]["responses"]["429"]["headers"]
    assert "Retry-After" in ops[("post", "/v1/datasets")]["responses"]["429"]["headers"]
    assert "Retry-After" in ops[("get", "/v1/jobs")]["responses"]["503"]["headers"]
    assert "Content-Range" in ops[DOWNLOAD]["responses"]["416"]["headers"]


def test_non_json_successes_have_their_real_media_types(document):
    ops = operations(document)
    assert list(ops[EVENT_STREAM]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert list(ops[METRICS]["responses"]["200"]["content"]) == ["text/plain"]
    download = ops[DOWNLOAD]["responses"]
    for status in ("200", "206"):
        assert download[status]["content"] == {"*/*": {"schema": {"type": "string", "format": "binary"}}}


LIFECYCLE_STATUSES = [lifecycle.QUEUED, lifecycle.RUNNING, lifecycle.CANCEL_REQUESTED, *lifecycle.TERMINAL]


def test_job_status_and_kind_are_enums_of_the_real_values(document):
    schemas = document["components"]["schemas"]
    kinds = schemas["JobCreate"]["properties"]["kind"]["enum"]  # what POST /v1/jobs accepts
    assert sorted(kinds) == ["benchmark", "compare", "distill", "generate", "teacher_cache"]
    job = schemas["JobOut"]["properties"]
    assert sorted(job["status"]["enum"]) == sorted(LIFECYCLE_STATUSES)
    assert sorted(job["kind"]["enum"]) == sorted(kinds)
    query = {p["name"]: p["schema"] for p in operations(document)[("get", "/v1/jobs")]["parameters"]}
    assert sorted(query["status"]["enum"]) == sorted(LIFECYCLE_STATUSES)
    assert sorted(query["kind"]["enum"]) == sorted(kinds)


def test_an_unknown_status_or_kind_filter_is_still_a_422_naming_the_choices(api):
    for name in ("status", "kind"):
        r = api.client.get(f"/v1/jobs?{name}=bogus", headers=api.headers)
        assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
        assert r.json()["errors"][0]["field"] == name and "expected one of" in r.json()["errors"][0]["message"]
    assert api.client.get("/v1/jobs?status=cancel_requested&kind=teacher_cache", headers=api.headers).json() == {
        "data": [],
        "has_more": False,
    }
