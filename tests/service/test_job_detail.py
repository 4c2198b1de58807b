"""A job's events (list and SSE stream, resumable), metrics, checkpoints and artifacts."""

from __future__ import annotations

import json
import threading
import time

from service.core.db.models import Checkpoint, StepMetric
from tests.service.factories import add_events, finish_job, insert_artifact, insert_job


def parse_sse(text: str) -> list[dict]:
    """Events of an SSE body as dicts with id, event, data (comments skipped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


def test_events_list_ascending_with_cursor(api):
    job_id = insert_job(api, events=5)
    c = api.client
    body = c.get(f"/v1/jobs/{job_id}/events", headers=api.headers).json()
    ids = [e["id"] for e in body["data"]]
    assert ids == sorted(ids) and len(ids) == 5 and body["has_more"] is False
    assert body["data"][0]["kind"] == "progress" and body["data"][0]["data"] == {"step": 0}
    later = c.get(f"/v1/jobs/{job_id}/events?after={ids[2]}", headers=api.headers).json()
    assert [e["id"] for e in later["data"]] == ids[3:]
    page = c.get(f"/v1/jobs/{job_id}/events?limit=2", headers=api.headers).json()
    assert [e["id"] for e in page["data"]] == ids[:2] and page["has_more"]
    r = c.get(f"/v1/jobs/{job_id}/events?after=-1", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "after"


def test_sse_stream_delivers_events_until_the_job_ends(api):
    job_id = insert_job(api, status="running", events=2)

    def worker() -> None:  # the job goes on while the client is connected
        time.sleep(0.2)
        add_events(api, job_id, 3)
        time.sleep(0.1)
        finish_job(api, job_id)

    thread = threading.Thread(target=worker)
    thread.start()
    r = api.client.get(f"/v1/jobs/{job_id}/events/stream", headers=api.headers)
    thread.join()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages = parse_sse(r.text)
    states = [e["data"] for e in messages if e["event"] == "state"]
    events = [e for e in messages if e["event"] != "state"]
    assert [e["event"] for e in events] == ["progress"] * 5 + ["succeeded"]
    # job state snapshots (no id: not replayed) when the state changes: first running, last succeeded
    assert all("id" not in e for e in messages if e["event"] == "state")
    assert states[0]["status"] == "running" and states[-1]["status"] == "succeeded", states
    assert set(states[-1]) == {"status", "progress", "summary", "waiting_on"} and states[-1]["waiting_on"] == []
    assert [int(e["id"]) for e in events] == [e["data"]["id"] for e in events]
    assert r.text.startswith(":")  # an opening comment flushes the headers through proxies

    # resuming: only what came after the last event seen
    third = events[2]["id"]
    resumed = [
        e
        for e in parse_sse(
            api.client.get(f"/v1/jobs/{job_id}/events/stream", headers={**api.headers, "Last-Event-ID": third}).text
        )
        if e["event"] != "state"
    ]
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]
    by_query = [
        e
        for e in parse_sse(api.client.get(f"/v1/jobs/{job_id}/events/stream?after={third}", headers=api.headers).text)
        if e["event"] != "state"
    ]
    assert by_query == resumed
    r = api.client.get(f"/v1/jobs/{job_id}/events/stream", headers={**api.headers, "Last-Event-ID": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Last-Event-ID"
    assert api.client.get("/v1/jobs/job_missing/events/stream", headers=api.headers).status_code == 404


def test_metrics_checkpoints_and_artifacts(api):
    job_id = insert_job(api)
    with api.db() as session:
        for step in (10, 20):
            session.add(StepMetric(job_id=job_id, step=step, kind="train", name="loss", value=1.0 / step))
            session.add(StepMetric(job_id=job_id, step=step, kind="train", name="lr", value=1e-4))
        session.add(StepMetric(job_id=job_id, step=20, kind="eval", name="val_kl", value=0.5))
        session.add(Checkpoint(job_id=job_id, step=20, path="/somewhere/step-20"))
    c = api.client
    everything = c.get(f"/v1/jobs/{job_id}/metrics", headers=api.headers).json()["data"]
    assert {m["name"] for m in everything} == {"loss", "lr", "val_kl"} and len(everything) == 5
    loss = c.get(f"/v1/jobs/{job_id}/metrics?name=loss", headers=api.headers).json()["data"]
    assert loss == [
        {"step": 10, "kind": "train", "name": "loss", "value": 0.1},
        {"step": 20, "kind": "train", "name": "loss", "value": 0.05},
    ]
    checkpoints = c.get(f"/v1/jobs/{job_id}/checkpoints", headers=api.headers).json()["data"]
    assert [cp["step"] for cp in checkpoints] == [20] and "path" not in checkpoints[0]
    art = insert_artifact(api, job_id, b"{}", name="summary.json")
    artifacts = c.get(f"/v1/jobs/{job_id}/artifacts", headers=api.headers).json()["data"]
    assert [a["id"] for a in artifacts] == [art] and artifacts[0]["name"] == "summary.json"


def test_deleting_a_finished_jobs_files_frees_them_and_keeps_its_history(api):
    from service.core.db.models import Job as JobRow
    from service.core.storage import job_output_dir

    job_id = insert_job(api, status="running", events=2)
    with api.db() as session:
        folder = job_output_dir(api.settings.artifact_root, session.get(JobRow, job_id))
    artifact = insert_artifact(api, job_id, b"x" * 1000, path=folder / "adapters.safetensors")
    (folder / ".attempts" / "1" / "checkpoints").mkdir(parents=True)
    (folder / ".attempts" / "1" / "checkpoints" / "w").write_bytes(b"y" * 500)
    url = f"/v1/jobs/{job_id}/files"
    r = api.client.delete(url, headers=api.headers)
    assert r.status_code == 409 and "running" in r.json()["detail"] and folder.is_dir()  # not while it runs
    user = insert_job(
        api,
        status="queued",
        spec={"student": {"model": "mdl_x", "adapter": job_id}, "teachers": [], "data": {"train": "ds_x"}},
    )
    finish_job(api, job_id)
    r = api.client.delete(url, headers=api.headers)
    assert r.status_code == 409 and user in r.json()["detail"]  # nor while used
    finish_job(api, user, "cancelled")
    insert_job(api, status="queued", spec={})  # a stored spec that names nothing readable: no 500
    other, _ = api.other_project()
    assert api.client.delete(url, headers=other).status_code == 404  # another project's

    r = api.client.delete(url, headers=api.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job_id, "freed_bytes": 1500, "artifacts_removed": 1}
    assert not folder.exists()
    assert api.client.get(f"/v1/artifacts/{artifact}", headers=api.headers).status_code == 404
    job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()
    assert job["status"] == "succeeded" and job["artifacts"] == []
    kinds = [e["kind"] for e in api.client.get(f"/v1/jobs/{job_id}/events", headers=api.headers).json()["data"]]
    assert kinds[-1] == "files_deleted" and kinds.count("progress") == 2
    assert api.client.delete(url, headers=api.headers).json()["freed_bytes"] == 0  # again: nothing left
