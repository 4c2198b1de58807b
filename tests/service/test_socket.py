"""The real thing over a socket: `distillery-server migrate`, `keys create` and `api` as processes (run from
outside the repository), then uploads, a job, a live SSE stream and a ranged download with httpx."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.core import lifecycle
from service.core.db.models import Artifact, Job, new_id
from service.core.db.session import make_engine
from tests.service.conftest import BROKER_URL, QUEUE
from tests.service.factories import TEXT_JSONL, model_folder

SERVER = str(Path(sys.executable).parent / "distillery-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, redis_broker):
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
        "DISTILLERY_BROKER_URL": BROKER_URL,
        "DISTILLERY_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "DISTILLERY_MODEL_ROOTS": json.dumps([str(tmp_path / "models")]),
        "DISTILLERY_EVENTS_POLL_SECONDS": "0.05",
    }
    run = dict(env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    migrated = subprocess.run([SERVER, "migrate"], **run)
    assert migrated.returncode == 0, migrated.stderr
    # exactly as the acceptance scripts read the key
    out = subprocess.run(["bash", "-c", f"{SERVER} keys create --project bars | tail -1 | awk '{{print $NF}}'"], **run)
    key = out.stdout.strip()
    assert out.returncode == 0 and key.startswith("dst_"), out
    port = free_port()
    proc = subprocess.Popen(
        [SERVER, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the API did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    yield client, env, tmp_path, redis_broker
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_api_over_a_socket(server):
    client, env, tmp, redis = server
    assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    dataset = client.post("/v1/datasets", files={"file": ("train.jsonl", TEXT_JSONL)}).json()
    assert dataset["records"] == 2
    models = [client.post("/v1/models", json={"path": str(model_folder(tmp / "models", n))}).json() for n in "st"]
    spec = {
        "student": {"model": models[0]["id"]},
        "teachers": [{"model": models[1]["id"]}],
        "teacher_mode": "online",
        "data": {"train": dataset["id"], "valid": 0.25},
        "training": {"steps": 5},
    }
    r = client.post("/v1/jobs", json={"kind": "distill", "spec": spec}, headers={"Idempotency-Key": "once"})
    assert r.status_code == 201, r.text
    job = r.json()
    assert redis.llen(QUEUE) == 1
    message = json.loads(redis.lindex(QUEUE, 0))
    assert message["headers"]["task"] == "distillery.run_job" and job["id"] in message["headers"]["argsrepr"]

    # a live event stream: events show up while the job runs, the stream ends when it finishes
    engine = make_engine(env["DISTILLERY_DATABASE_URL"])
    received: list[tuple[float, dict]] = []
    finished_at: list[float] = []

    def run_job() -> None:
        from sqlalchemy.orm import Session

        time.sleep(0.3)
        with Session(engine) as session:
            lifecycle.add_event(session, job["id"], "progress", "step 1", {"step": 1})
            session.commit()
        time.sleep(0.5)
        with Session(engine) as session:
            lifecycle.finish(session, job["id"], None, "succeeded")
            session.commit()
        finished_at.append(time.monotonic())

    worker = threading.Thread(target=run_job)
    worker.start()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        for line in stream.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                name, _, value = line.partition(": ")
                event[name] = value
            elif not line and "data" in event:
                received.append((time.monotonic(), event))
                event = {}
    worker.join()
    states = [json.loads(e["data"]) for _, e in received if e["event"] == "state"]
    received = [(t, e) for t, e in received if e["event"] != "state"]
    kinds = [e["event"] for _, e in received]
    assert kinds == ["created", "progress", "succeeded"]
    assert states[-1]["status"] == "succeeded" and all("id" not in e for e in states)
    progress_seen = received[1][0]
    assert progress_seen < finished_at[0]  # delivered live, not when the stream closed

    # resume after the progress event: only the end
    last_id = received[1][1]["id"]
    resumed = client.get(f"/v1/jobs/{job['id']}/events/stream", headers={"Last-Event-ID": last_id}).text
    assert "event: succeeded" in resumed and "event: progress" not in resumed

    # a ranged download of an artifact of the job
    content = os.urandom(100_000)
    path = tmp / "artifacts" / "jobs" / job["id"] / "adapters.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        project_id = session.get(Job, job["id"]).project_id
        art = Artifact(
            id=new_id("art"),
            project_id=project_id,
            job_id=job["id"],
            name="adapters.safetensors",
            path=str(path),
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            content_type="application/octet-stream",
        )
        session.add(art)
        session.commit()
        art_id = art.id
    engine.dispose()
    head = client.get(f"/v1/artifacts/{art_id}/content", headers={"Range": "bytes=0-49999"})
    tail = client.get(f"/v1/artifacts/{art_id}/content", headers={"Range": "bytes=50000-"})
    assert head.status_code == tail.status_code == 206
    assert head.content + tail.content == content
    assert hashlib.sha256(head.content + tail.content).hexdigest() == head.headers["x-content-sha256"]
    assert client.get("/v1/jobs").json()["data"][0]["artifacts"][0]["id"] == art_id
