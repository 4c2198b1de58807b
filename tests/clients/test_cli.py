"""The `distillery` command line against the real API process: every command, `--json` for scripts, and the
exit codes scripts rely on (0 ok, 1 refused, 2 usage, 3 job failed, 4 unreachable, 5 timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.services import free_port


@pytest.fixture(scope="module")
def ids(server, tiny_text, tiny_teacher, tiny_student):
    with server.client() as c:
        return {
            "dataset": c.datasets.upload(tiny_text["train"], name="cli-train").id,
            "teacher": c.models.add(tiny_teacher, name="cli-teacher").id,
            "student": c.models.add(tiny_student, name="cli-student").id,
        }


def job_file(tmp_path: Path, ids: dict, **training) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "distill",
                "spec": {
                    "student": {"model": ids["student"]},
                    "teachers": [{"model": ids["teacher"]}],
                    "teacher_mode": "online",
                    "data": {"train": ids["dataset"], "valid": 0.25},
                    "training": {"steps": 2, **training},
                },
            }
        )
    )
    return path


def finish_next_job(server, status: str, **error) -> threading.Thread:
    """Act as a worker: run the next job that appears (events, progress), then end it with `status`."""
    with server.db() as session:
        from sqlalchemy import func, select

        from service.core.db.models import Job

        before = session.scalar(select(func.count()).select_from(Job))

    def work():
        from sqlalchemy import select

        from service.core import lifecycle
        from service.core.db.models import Job

        for _ in range(200):
            with server.db() as session:
                jobs = session.scalars(select(Job).order_by(Job.id)).all()
            if len(jobs) > before:
                break
            time.sleep(0.02)
        job_id = jobs[-1].id
        with server.db() as session:
            job = session.get(Job, job_id)
            job.status, job.total_steps = "running", 2
            lifecycle.add_event(session, job_id, "started", "started on test-worker")
        server.set_progress(job_id, 1, loss=2.5, tokens_per_second=100.0)
        server.add_events(job_id, 2)
        server.set_progress(job_id, 2, loss=1.5, tokens_per_second=110.0)
        server.finish(job_id, status, **error)

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_resources_as_tables_and_json(cli, ids, tiny_text, tiny_student, tmp_path):
    code, out, _ = cli("datasets", "upload", str(tiny_text["valid"]), "--name", "valid", "--json")
    assert code == 0 and json.loads(out)["records"] == 8
    ds = json.loads(out)["id"]
    code, out, _ = cli("datasets", "list")
    assert code == 0 and ds in out and "RECORDS" in out
    code, out, _ = cli("datasets", "get", ds, "--json")
    assert code == 0 and json.loads(out)["name"] == "valid"
    code, out, _ = cli("datasets", "delete", ds)
    assert code == 0 and out.strip() == f"deleted {ds}"
    code, out, _ = cli("models", "add", str(tiny_student), "--name", "s2", "--json")
    assert code == 0 and json.loads(out)["name"] == "s2"
    code, out, _ = cli("models", "list", "--json")
    assert code == 0 and ids["teacher"] in {m["id"] for m in json.loads(out)}
    code, out, _ = cli("models", "get", ids["teacher"])
    assert code == 0 and "cli-teacher" in out


def test_job_commands(cli, server, ids, tmp_path):
    code, out, _ = cli("submit", str(job_file(tmp_path, ids)), "--json")
    assert code == 0
    job_id = json.loads(out)["id"]
    code, out, _ = cli("submit", str(job_file(tmp_path, ids)))
    assert code == 0 and out.strip().startswith("job_")  # not a terminal: the id alone, for $(...)
    code, out, _ = cli("--json", "jobs", "--kind", "distill")
    assert code == 0 and job_id in {j["id"] for j in json.loads(out)}
    code, out, _ = cli("jobs", "--status", "queued", "--limit", "1")
    assert code == 0 and len([line for line in out.splitlines() if line.startswith("job_")]) == 1
    code, out, _ = cli("status", job_id)
    assert code == 0 and job_id in out and "queued" in out
    code, out, _ = cli("logs", job_id, "--json")
    assert code == 0 and json.loads(out)[0]["kind"] == "created"
    for command in ("metrics", "checkpoints", "artifacts"):
        code, out, _ = cli(command, job_id, "--json")
        assert code == 0 and json.loads(out) == [], command
    code, out, _ = cli("cancel", job_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, out, _ = cli("download", job_id, "--out", str(tmp_path / "out"), "--json")
    assert code == 0 and json.loads(out) == []


def test_submit_wait_follows_to_the_end(cli, server, ids, tmp_path):
    worker = finish_next_job(server, "succeeded")
    code, out, err = cli("submit", str(job_file(tmp_path, ids)), "--wait", "--json")
    worker.join()
    job = json.loads(out)
    assert code == 0 and job["status"] == "succeeded" and job["progress"]["step"] == 2

    job_id = server.insert_job()
    server.insert_artifact(job_id, "adapters.safetensors", b"\x01" * 1000)
    server.insert_artifact(job_id, "student/config.json", b"{}")
    threading.Timer(0.3, server.finish, (job_id,)).start()
    code, out, _ = cli("logs", job_id, "-f")
    assert code == 0 and "succeeded" in out.splitlines()[-1]
    code, out, _ = cli("download", job_id, "--out", str(tmp_path / "dl"))
    assert code == 0 and (tmp_path / "dl" / "student" / "config.json").read_bytes() == b"{}"
    code, out, _ = cli("wait", job_id, "--json")
    assert code == 0 and json.loads(out)["id"] == job_id


def test_a_failed_job_exits_3_with_its_error(cli, server, ids, tmp_path):
    worker = finish_next_job(server, "failed", error_code="user_error", error_message="data: train.jsonl:3: bad")
    code, out, err = cli("submit", str(job_file(tmp_path, ids)), "--wait")
    worker.join()
    assert code == 3
    assert err.strip().splitlines()[-1] == f"error: job {out.split()[1]} failed: user_error: data: train.jsonl:3: bad"
    job_id = server.insert_job()
    threading.Timer(0.3, server.finish, (job_id, "cancelled")).start()
    code, out, _ = cli("logs", job_id, "--follow", "--json")
    assert code == 3 and json.loads(out.splitlines()[-1])["kind"] == "cancelled"


def test_wait_timeout_exits_5(cli, server):
    job_id = server.insert_job()
    code, out, err = cli("wait", job_id, "--timeout", "0.3")
    assert code == 5 and "still running" in err
    server.finish(job_id)


def test_errors_are_one_line_with_distinct_codes(cli, ids, tmp_path, monkeypatch):
    code, out, err = cli("status", "job_nope")
    assert code == 1 and out == "" and err.startswith("error: 404") and len(err.strip().splitlines()) == 1
    bad = job_file(tmp_path, ids, steps=0)
    code, _, err = cli("submit", str(bad))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{bad}:" in err and "spec.training.steps" in err  # the file, its line and the field
    code, _, err = cli("submit", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml" in err
    code, _, _ = cli("status")  # usage
    assert code == 2
    code, _, _ = cli("frobnicate")
    assert code == 2
    code, _, err = cli("status", "x", "--api-key", "dst_bad")
    assert code == 1 and "401" in err
    code, _, err = cli("jobs", "--base-url", f"http://127.0.0.1:{free_port()}")
    assert code == 4 and err.startswith("error: cannot reach the server") and len(err.strip().splitlines()) == 1


def test_console_script(server):
    exe = Path(sys.executable).parent / "distillery"
    env = {**os.environ, "DISTILLERY_BASE_URL": server.url, "DISTILLERY_API_KEY": server.key}
    r = subprocess.run([str(exe), "jobs", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)
    r = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "exit codes" in r.stdout


def test_a_job_that_shipped_its_start_says_so(cli, server):
    """A run whose trained steps never beat the starting student succeeds, and every surface warns about it."""
    import warnings

    from distillery import JobWarningIssued

    message = "no trained step beat the starting student (val KL 0.4080 at step 0): the run ships it unchanged"
    job_id = server.insert_job()
    server.finish(
        job_id,
        "succeeded",
        summary={
            "best": {"step": 0, "val_kl": 0.408},
            "shipped": "start",
            "warnings": [{"code": "no_improvement", "message": message}],
        },
    )
    code, out, _ = cli("status", job_id)
    assert code == 0 and "warning" in out and "starting student" in " ".join(out.split())
    code, out, err = cli("wait", job_id)
    assert code == 0 and err.startswith("warning: no trained step beat the starting student")
    with server.client() as c, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        job = c.jobs.wait(job_id)
    assert [w.code for w in job.warnings] == ["no_improvement"]
    assert [str(w.message) for w in seen if w.category is JobWarningIssued] == [f"job {job_id}: {message}"]
