"""Operations routes, error shapes of the framework's own errors, OpenAPI, and the no-MLX rule."""

from __future__ import annotations

import subprocess
import sys

from tests.service.conftest import closed_port, running_api
from tests.service.factories import insert_job

PROBLEM = "application/problem+json"


def test_healthz_and_readyz(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_names_what_is_down(database_url, tmp_path, redis_broker):
    with running_api(database_url, tmp_path, redis_broker, broker_url=f"redis://127.0.0.1:{closed_port()}/0") as a:
        r = a.client.get("/readyz")
        assert r.status_code == 503 and r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["errors"] == [{"field": "broker", "message": "unreachable"}]
        assert "broker" in r.json()["detail"] and "database" not in r.json()["detail"]
        assert a.client.get("/healthz").status_code == 200


def test_readyz_with_the_database_down(tmp_path, redis_broker):
    from litestar.testing import TestClient

    from service.core.settings import Settings
    from service.http.app import create_app

    settings = Settings(
        database_url=f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing",
        broker_url="redis://127.0.0.1:6379/15",
        artifact_root=tmp_path,
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["errors"] == [{"field": "database", "message": "unreachable"}]
        # and a request that needs the database is a 503 problem saying when to retry, not a crash
        r = client.get("/v1/jobs", headers={"Authorization": "Bearer dst_abc_def"})
        assert r.status_code == 503 and r.headers["content-type"].startswith(PROBLEM)
        assert int(r.headers["retry-after"]) > 0


METRICS_TOKEN = "scrape-secret"


def test_prometheus_metrics(database_url, tmp_path, redis_broker):
    with running_api(database_url, tmp_path, redis_broker, metrics_token=METRICS_TOKEN) as api:
        insert_job(api, status="running")
        insert_job(api, status="queued")
        api.client.get("/v1/jobs", headers=api.headers)
        api.client.get("/v1/jobs/job_missing", headers=api.headers)
        api.client.get("/v1/jobs")
        r = api.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert 'distillery_http_requests_total{method="GET",route="/v1/jobs",status="200"} 1.0' in text
        assert 'distillery_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
        assert 'distillery_http_requests_total{method="GET",route="/v1/jobs",status="401"} 1.0' in text
        assert 'distillery_http_request_duration_seconds_bucket{le="0.5",method="GET",route="/v1/jobs"}' in text
        assert 'distillery_jobs{status="running"} 1.0' in text and 'distillery_jobs{status="queued"} 1.0' in text
        assert 'distillery_jobs{status="failed"} 0.0' in text
        assert "process_resident_memory_bytes" in text


def _tenant_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("distillery_", "# HELP distillery_"))]


def test_public_metrics_show_nothing_about_tenants(database_url, tmp_path, redis_broker):
    """Without the operator token (or with none set), /metrics is the process's own metrics only: no job counts,
    nothing counted from anyone's requests."""
    for token in (None, METRICS_TOKEN):
        with running_api(database_url, tmp_path, redis_broker, metrics_token=token) as api:
            insert_job(api, status="running")
            api.client.get("/v1/jobs", headers=api.headers)
            for headers in ({}, {"Authorization": "Basic b3A6c2VjcmV0"}):
                r = api.client.get("/metrics", headers=headers)
                assert r.status_code == 200, (token, headers, r.text)
                assert _tenant_series(r.text) == [], (token, headers)
                assert "process_resident_memory_bytes" in r.text and "python_info" in r.text
            # an API key is no operator token: with a token set it is a wrong one, without it is ignored
            r = api.client.get("/metrics", headers=api.headers)
            assert r.status_code == (401 if token else 200) and _tenant_series(r.text) == []


def test_a_wrong_metrics_token_is_401_and_limited(database_url, tmp_path, redis_broker):
    with running_api(
        database_url,
        tmp_path,
        redis_broker,
        metrics_token=METRICS_TOKEN,
        auth_failure_burst=3,
        auth_failure_per_second=0.5,
    ) as api:
        for _ in range(3):
            r = api.client.get("/metrics", headers={"Authorization": "Bearer guess"})
            assert r.status_code == 401 and r.headers["content-type"].startswith(PROBLEM), r.text
            assert r.headers["www-authenticate"].lower().startswith("bearer")
        r = api.client.get("/metrics", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # the right token was never accepted yet, so it waits too: the limit cannot be used as an oracle
        assert api.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 429


def test_framework_errors_are_problems(api):
    r = api.client.get("/v1/nothing-here", headers=api.headers)
    assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)
    assert r.json()["type"].endswith("not-found") and "/v1/nothing-here" in r.json()["detail"]
    r = api.client.put("/v1/jobs", headers=api.headers, json={})
    assert r.status_code == 405 and r.headers["content-type"].startswith(PROBLEM)
    assert "PUT" in r.json()["detail"]


def test_openapi_documents_the_job_specs(api):
    schema = api.client.get("/schema/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("DistillSpec", "TeacherCacheSpec", "BenchmarkSpec", "TrainingSpec", "JobCreate", "JobOut"):
        assert name in components, name
    assert "steps" in components["TrainingSpec"]["properties"]
    assert "/v1/jobs" in schema["paths"] and "/v1/artifacts/{artifact_id}/content" in schema["paths"]
    upload = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert "file" in upload["multipart/form-data"]["schema"]["properties"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_api_process_never_imports_mlx():
    code = (
        "import sys\n"
        "from service.http.app import create_app\n"
        "from service.core.settings import Settings\n"
        "from litestar.testing import TestClient\n"
        "app = create_app(Settings(database_url='sqlite://', broker_url='memory://'))\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/schema/openapi.json').status_code == 200\n"
        "import service.commands.cli\n"
        "bad = sorted(m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
