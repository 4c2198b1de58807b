"""`distillery-server dev`: API + worker on SQLite and the SQLite broker, started the way a user does it:
`migrate`, `keys create`, then `dev` — which must keep that key working, print no new one, run a job, and stop
both processes on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.worker.conftest import ROOT, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.commands.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(out) and not out.startswith("Z")


def test_dev_runs_api_and_worker_on_the_embedded_default(tmp_path, tiny_teacher, tiny_student, tiny_text):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        DISTILLERY_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    assert cli("migrate", env=env).returncode == 0
    created = cli("keys", "create", "--project", "bars", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]

    port = free_port()
    log = open(tmp_path / "dev.log", "w")
    dev = subprocess.Popen(
        [sys.executable, "-m", "service.commands.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy():
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the API", interval=0.5)
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        ds = {}
        for split in ("train", "valid"):
            with open(tiny_text[split], "rb") as f:
                r = c.post("/v1/datasets", files={"file": (f"{split}.jsonl", f)}, data={"name": split})
            assert r.status_code == 201, r.text
            ds[split] = r.json()["id"]
        models = {}
        for name, path in (("teacher", tiny_teacher), ("student", tiny_student)):
            r = c.post("/v1/models", json={"name": name, "path": str(path)})
            assert r.status_code == 201, r.text
            models[name] = r.json()["id"]
        spec = {
            "student": {"model": models["student"]},
            "teachers": [{"model": models["teacher"]}],
            "data": {"train": ds["train"], "valid": ds["valid"]},
            "loss": {"top_k": 16},
            "adapter": {"rank": 4},
            "training": {"steps": 4, "batch_size": 4, "max_seq_len": 48, "eval_every": 2, "checkpoint_every": 2},
        }
        r = c.post("/v1/jobs", json={"kind": "distill", "spec": spec})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_for(
            lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed", "cancelled") and j,
            120,
            "the job to end",
            interval=0.5,
        )
        assert job["status"] == "succeeded", job
        names = {a["name"] for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        assert {"adapters.safetensors", "adapter_config.json"} <= names
    finally:
        workers = children_of(dev.pid)
        dev.send_signal(signal.SIGTERM)
        try:
            code = dev.wait(60)
        except subprocess.TimeoutExpired:
            dev.kill()
            pytest.fail("dev did not stop on SIGTERM")
        log.close()
    output = (tmp_path / "dev.log").read_text()
    assert code == 0, output[-3000:]
    assert f"http://127.0.0.1:{port}" in output
    assert "dst_" not in output, "dev printed a new key although one existed"
    assert workers and not any(alive(p) for p in workers), "the worker outlived dev"
    assert (tmp_path / "db-broker.db").exists()  # the embedded broker sits beside the database
