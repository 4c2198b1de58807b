"""A property-based fuzz of every operation against the app's own OpenAPI document (schemathesis).

For each operation schemathesis sends requests derived from the document: boundary and wrong-typed values of
every parameter and body field, a missing or wrong Authorization, methods the path does not allow, then random
valid and invalid requests. Whatever it sends, the API must answer as its document says:
- never a 5xx;
- every 4xx is a problem: `application/problem+json`, whose `status` is the HTTP status;
- every status is one the document lists for the operation (schemathesis' `status_code_conformance`), so
  the problem responses published by service.http.openapi cannot fall behind the code.

The app runs in-process (ASGI) on one SQLite database holding a project and its API key, sent on every request
(the cases that test authentication replace it). The run is bounded (EXAMPLES_PER_OPERATION random requests
per operation on top of the boundary cases; about 15 s in all on two slow cores) and deterministic: derandomized,
fixed seed, no example database, so CI sends the same requests every time. DISTILLERY_FUZZ_EXAMPLES=500 runs a
deeper search locally.

The SSE stream and the artifact download are fuzzed like the rest: the database holds no job and no artifact
(every job the fuzz could create names models and datasets that do not exist), so every id it sends is
unknown and both answer at once (404 or 422) instead of streaming.
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import status_code_conformance

from service.core.settings import Settings
from service.http.app import create_app
from service.http.auth import create_api_key
from service.http.problems import PROBLEM_JSON
from tests.service.conftest import make_settings

SEED = 20240611
EXAMPLES_PER_OPERATION = int(os.environ.get("DISTILLERY_FUZZ_EXAMPLES", "10"))

FUZZ_CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "suppress-health-check": ["all"],  # generation speed depends on the machine; CI must not fail on it
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},  # one request at a time; nothing links the operations' ids
    }
)

# The document is read once, at collection (schemathesis makes one test per operation from it), from an app
# that never opens its database; the requests go to `fuzzed_app`, built by the same code on a real database.
schema = schemathesis.openapi.from_asgi(
    "/schema/openapi.json", create_app(Settings(database_url="sqlite://", broker_url="memory://")), config=FUZZ_CONFIG
)


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, sqlite_template) -> SimpleNamespace:
    """The app under fuzz (SQLite, empty but for one project) and headers with its API key. `make_settings`
    confines model paths to an empty folder and uploads to 64 KiB, so no request reaches the host's files."""
    tmp = tmp_path_factory.mktemp("fuzz")
    shutil.copy(sqlite_template, tmp / "distillery.db")
    app = create_app(make_settings(f"sqlite:///{tmp / 'distillery.db'}", tmp))
    with app.state.sessions() as session:
        _, key = create_api_key(session, "main")
        session.commit()
    return SimpleNamespace(app=app, headers={"Authorization": f"Bearer {key}"})


@schema.parametrize()
def test_every_operation_answers_as_documented(case, fuzzed_app):
    response = case.call(app=fuzzed_app.app, headers=fuzzed_app.headers)
    seen = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, seen
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith(PROBLEM_JSON), seen
        assert response.json()["status"] == response.status_code, seen
    case.validate_response(response, checks=[status_code_conformance])
