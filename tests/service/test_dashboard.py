"""The dashboard at `/`, its static files and the API docs: served by the API from the package, nothing from a
CDN, no file outside the static folder reachable, no key needed and no data in them; and `POST
/v1/jobs/estimate`, scoped and validated like `POST /v1/jobs`."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.core.db.models import Job
from service.http.dashboard import STATIC_DIR
from tests.helpers.api_process import api_process
from tests.service.factories import finish_job, setup_distill

CDN = re.compile(r"https?://(?!127\.0\.0\.1|localhost)[\w.-]+", re.I)


def local_assets(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def test_dashboard_page_and_its_assets_are_served_locally(api):
    r = api.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert not CDN.search(r.text)
    assets = [a for a in local_assets(r.text) if a.startswith("/static/")]
    assert {"/static/dashboard/js/app.js", "/static/dashboard/style.css", "/static/vendor/uplot/uPlot.min.css"} <= set(
        assets
    )
    for asset in assets:
        got = api.client.get(asset)
        assert got.status_code == 200, asset
    js = api.client.get("/static/dashboard/js/app.js")
    assert js.headers["content-type"].startswith("text/javascript")
    # every module the dashboard imports is served, and none comes from outside
    for module in sorted((STATIC_DIR / "dashboard" / "js").glob("*.js")):
        text = module.read_text()
        assert not CDN.search(text), module.name
        for imported in re.findall(r"""from\s+["']([^"']+)["']""", text):
            url = imported if imported.startswith("/") else f"/static/dashboard/js/{imported.removeprefix('./')}"
            assert api.client.get(url).status_code == 200, (module.name, imported)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_api_docs_load_their_assets_from_this_server(api):
    for path, needle in (
        ("/schema", "SwaggerUIBundle"),
        ("/schema/swagger", "SwaggerUIBundle"),
        ("/schema/redoc", "Redoc.init"),
    ):
        r = api.client.get(path)
        assert r.status_code == 200 and needle in r.text, path
        assert not CDN.search(r.text.split("<body", 1)[0]), path  # the head loads nothing from outside
        for asset in local_assets(r.text.split("<body", 1)[0]):
            assert asset.startswith("/static/vendor/"), asset
            assert api.client.get(asset).status_code == 200, asset
    assert api.client.get("/schema/openapi.json").json()["info"]["title"] == "Distillery"
    assert "openapi:" in api.client.get("/schema/openapi.yaml").text
    assert (STATIC_DIR / "vendor" / "swagger-ui" / "LICENSE").is_file()
    assert "5.35.0" in (STATIC_DIR / "vendor" / "VENDORED.md").read_text()


def raw_get(base: str, path: str) -> int:
    """The status of a GET whose path is sent byte for byte (no client normalises `..` away)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def test_static_files_never_reach_outside_the_static_folder(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", DISTILLERY_BROKER_URL="memory://")
    (tmp_path / "secret.txt").write_text("not for you")
    with api_process(env, Path(__file__).resolve().parents[2]) as (base, _):
        assert raw_get(base, "/static/dashboard/style.css") == 200
        for path in (
            "/static/../dashboard.py",
            "/static/../../../pyproject.toml",
            "/static/%2e%2e/dashboard.py",
            "/static/%2e%2e%2f%2e%2e%2fapp.py",
            "/static/dashboard/..%2f..%2fdashboard.py",
            "/static//etc/passwd",
            f"/static/{tmp_path}/secret.txt",
            "/static/",
            "/static/dashboard/",
        ):
            status = raw_get(base, path)
            assert status in (400, 404), (path, status)


def test_estimate_reports_cache_reuse_tokens_and_memory(api):
    spec = setup_distill(api)
    body = {"kind": "distill", "spec": {**spec, "training": {**spec["training"], "learning_rate": 1e-4}}}
    r = api.client.post("/v1/jobs/estimate", json=body, headers=api.headers)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["tokens"] == 10 * 2 * 1 * 64  # steps x batch x accum x length, no rate search
    assert est["memory_bytes"] > 0
    assert est["seconds"] is None  # no earlier run of this student
    assert [c["job_id"] for c in est["teacher_caches"]] == [None]
    with api.db() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0  # nothing was created

    created = api.client.post("/v1/jobs", json=body, headers=api.headers)
    assert created.status_code == 201, created.text
    est = api.client.post("/v1/jobs/estimate", json=body, headers=api.headers).json()
    cache = est["teacher_caches"][0]
    assert cache["job_id"] and cache["status"] == "queued"
    assert any("1 teacher cache(s) reused" in n for n in est["notes"])

    # a finished run of the same student gives the speed, hence a time
    with api.db() as session:
        job = session.get(Job, created.json()["id"])
        job.summary = {"train": {"tokens_per_second": 640.0}}
    finish_job(api, created.json()["id"])
    est = api.client.post("/v1/jobs/estimate", json=body, headers=api.headers).json()
    assert est["seconds"] == pytest.approx(1280 / 640.0)

    auto = {"kind": "distill", "spec": spec}  # learning_rate auto: the search's trial steps count
    assert api.client.post("/v1/jobs/estimate", json=auto, headers=api.headers).json()["tokens"] > 1280


def test_estimate_is_scoped_and_validated(api):
    spec = setup_distill(api)
    body = {"kind": "distill", "spec": spec}
    other, _ = api.other_project()
    r = api.client.post("/v1/jobs/estimate", json=body, headers=other)
    assert r.status_code == 422
    assert {e["field"] for e in r.json()["errors"]} >= {"spec.student.model", "spec.data.train"}
    bad = api.client.post(
        "/v1/jobs/estimate", json={"kind": "distill", "spec": {**spec, "training": {"steps": 0}}}, headers=api.headers
    )
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"].startswith("spec.training.steps")
    assert api.client.post("/v1/jobs/estimate", json=body).status_code == 401
    assert (
        api.client.post(
            "/v1/jobs/estimate", content=b"kind=distill", headers={**api.headers, "Content-Type": "text/plain"}
        ).status_code
        == 415
    )
    assert (
        api.client.post(
            "/v1/jobs/estimate", content=b"{", headers={**api.headers, "Content-Type": "application/json"}
        ).status_code
        == 400
    )
