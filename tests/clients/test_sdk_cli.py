"""The Python SDK and CLI (clients/python) against a real `distillery-server api` process on SQLite over a socket,
with Redis (db 12) as the broker; no worker: jobs stay queued, which is all these calls need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from distillery import (AuthenticationError, BadRequestError, Distillery, Job, NotFoundError)
from distillery.cli import main
from tests.helpers.services import close_redis, free_port, redis_client, wait_for

SERVER = str(Path(sys.executable).parent / "distillery-server")
BROKER_URL = os.environ.get("DISTILLERY_TEST_CLIENT_REDIS", "redis://127.0.0.1:6379/12")


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_root):
    broker = redis_client(BROKER_URL)
    tmp = tmp_path_factory.mktemp("client-api")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATABASE_URL=f"sqlite:///{tmp / 'api.db'}", DISTILLERY_BROKER_URL=BROKER_URL,
               DISTILLERY_ARTIFACT_ROOT=str(tmp / "artifacts"), DISTILLERY_MODEL_ROOTS=json.dumps([str(tiny_root)]))
    run = dict(env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    assert subprocess.run([SERVER, "migrate"], **run).returncode == 0
    created = subprocess.run([SERVER, "keys", "create", "--project", "sdk"], **run)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1].split()[-1]
    port = free_port()
    log = open(tmp / "api.log", "w")
    proc = subprocess.Popen([SERVER, "api", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp / "api.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "the API", interval=0.1)
        yield url, key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        close_redis(broker)


@pytest.fixture(scope="module")
def registered(api, tiny_text, tiny_teacher, tiny_student):
    url, key = api
    with Distillery(url, key) as c:
        ds = c.datasets.upload(tiny_text["train"], name="train")
        teacher = c.models.add(tiny_teacher, name="teacher")
        student = c.models.add(tiny_student)
    return {"dataset": ds, "teacher": teacher, "student": student}


def job_body(r) -> dict:
    return {"kind": "distill", "spec": {"student": {"model": r["student"].id}, "teachers": [{"model": r["teacher"].id}],
                                        "teacher_mode": "online", "data": {"train": r["dataset"].id, "valid": 0.25},
                                        "training": {"steps": 2}}}


@pytest.fixture
def client(api, monkeypatch):
    monkeypatch.setenv("DISTILLERY_BASE_URL", api[0])
    monkeypatch.setenv("DISTILLERY_API_KEY", api[1])
    with Distillery(backoff=0.01) as c:   # from the environment
        yield c


def test_resources(client, registered, tmp_path):
    ds = registered["dataset"]
    assert ds.format == "text" and ds.records == 48
    assert client.datasets.get(ds.id).id == ds.id
    assert ds.id in {d.id for d in client.datasets.list()}
    assert {registered["teacher"].id, registered["student"].id} <= {m.id for m in client.models.list(limit=1)}
    assert client.models.get(registered["teacher"].id).name == "teacher"

    job = client.jobs.create(job_body(registered))
    assert isinstance(job, Job) and job.status == "queued" and job.kind == "distill"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_body(registered)))
    job2 = client.jobs.create(path)
    job3 = client.jobs.create(str(path))
    ids = {job.id, job2.id, job3.id}
    assert len(ids) == 3
    listed = [j.id for j in client.jobs.list(limit=1)]     # one per page: follows the cursor
    assert ids <= set(listed) and len(listed) == len(set(listed))
    assert {j.id for j in client.jobs.list(status="queued", kind="distill")} >= ids
    assert client.jobs.get(job.id).spec["training"]["steps"] == 2
    events = client.jobs.events(job.id)
    assert events and events[0].kind == "created"
    assert client.jobs.events(job.id, after=events[-1].id) == []
    cancelled = client.jobs.cancel(job2.id)
    assert cancelled.status in ("cancelled", "cancel_requested") or cancelled.model_extra.get("cancel_requested")
    assert client.jobs.metrics(job.id) == []
    assert client.artifacts.list(job.id) == []


def test_typed_errors(client, api, registered):
    with pytest.raises(NotFoundError) as e:
        client.jobs.get("job_doesnotexist")
    assert e.value.status == 404 and e.value.problem["status"] == 404 and e.value.detail
    body = job_body(registered)
    body["spec"]["training"]["steps"] = 0
    with pytest.raises(BadRequestError) as e:
        client.jobs.create(body)
    assert e.value.status == 422 and any("steps" in (x.get("field") or "") for x in e.value.errors)
    with Distillery(api[0], "dst_wrong") as bad, pytest.raises(AuthenticationError) as e:
        bad.datasets.list()
    assert e.value.status == 401


class DropFirstResponse(httpx.BaseTransport):
    """Sends every request; on the first POST, loses the response (as if the connection died after sending)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.posts.append(request.headers.get("Idempotency-Key"))
            if len(self.posts) == 1:
                response.read()
                response.close()
                raise httpx.ReadError("connection lost after sending", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_post_retry_is_idempotent(api, registered):
    transport = DropFirstResponse()
    with Distillery(api[0], api[1], transport=transport, backoff=0.01) as c:
        before = {j.id for j in c.jobs.list()}
        job = c.jobs.create(job_body(registered))
        after = {j.id for j in c.jobs.list()}
    assert len(transport.posts) == 2 and transport.posts[0] == transport.posts[1] and transport.posts[0]
    assert after - before == {job.id}          # the retry returned the first attempt's job, not a second one


def test_cli(api, registered, tiny_text, tiny_student, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLERY_BASE_URL", api[0])
    monkeypatch.setenv("DISTILLERY_API_KEY", api[1])

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("datasets", "upload", str(tiny_text["valid"]), "--name", "valid", "--json")
    assert code == 0 and json.loads(out)["records"] == 8
    code, out, _ = cli("models", "add", str(tiny_student), "--name", "s2", "--json")
    assert code == 0 and json.loads(out)["name"] == "s2"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job_body(registered)))
    code, out, _ = cli("submit", str(spec), "--json")
    assert code == 0
    job_id = json.loads(out)["id"]
    code, out, _ = cli("--json", "jobs")
    assert code == 0 and job_id in {j["id"] for j in json.loads(out)}
    code, out, _ = cli("status", job_id)
    assert code == 0 and job_id in out and "queued" in out
    code, out, _ = cli("logs", job_id, "--json")
    assert code == 0 and json.loads(out)[0]["kind"] == "created"
    code, out, _ = cli("metrics", job_id, "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = cli("cancel", job_id, "--json")
    assert code == 0 and json.loads(out)["id"] == job_id
    code, out, _ = cli("download", job_id, "--out", str(tmp_path / "out"), "--json")
    assert code == 0 and json.loads(out) == []

    code, out, err = cli("status", "job_nope")
    assert code == 1 and out == "" and err.startswith("error: 404") and len(err.strip().splitlines()) == 1
    bad = job_body(registered)
    bad["spec"]["training"]["steps"] = 0
    spec.write_text(yaml.safe_dump(bad))
    code, _, err = cli("submit", str(spec))
    assert code == 1 and "steps" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("status")                     # usage
    assert code == 2
    code, _, err = cli("status", "x", "--api-key", "dst_bad")
    assert code == 1 and "401" in err


def test_console_script(api):
    exe = Path(sys.executable).parent / "distillery"
    env = {**os.environ, "DISTILLERY_BASE_URL": api[0], "DISTILLERY_API_KEY": api[1]}
    r = subprocess.run([str(exe), "jobs", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)
