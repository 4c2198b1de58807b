"""End to end with real processes, as in production: `distillery-server migrate` and `keys create` on a fresh
PostgreSQL database, then `distillery-server api` and `distillery-server worker` as subprocesses with Redis
(db 13) as the broker. Everything after that goes over HTTP: upload datasets, register models by path, submit
an offline distill job, follow its events over SSE (reconnecting once with `Last-Event-ID`), read its progress,
summary and metrics, download the adapter (checking the sha256 header) and load it with mlx_lm.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers.services import ROOT, close_redis, free_port, redis_client, wait_for

BROKER_URL = os.environ.get("DISTILLERY_TEST_E2E_REDIS", "redis://127.0.0.1:6379/13")
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Stack:
    url: str
    key: str
    folder: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, **kw)

    def logs(self) -> str:
        return "\n".join(
            f"----- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(self.folder.glob("*.log"))
        )

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"process(es) exited: {dead}\n{self.logs()}")


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.commands.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


@pytest.fixture
def stack(tmp_path, fresh_pg_url) -> Iterator[Stack]:
    broker = redis_client(BROKER_URL)  # emptied
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_DATABASE_URL=fresh_pg_url,
        DISTILLERY_BROKER_URL=BROKER_URL,
        DISTILLERY_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        DISTILLERY_EVENTS_POLL_SECONDS="0.05",
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    migrated = cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    created = cli("keys", "create", "--project", "e2e", env=env)
    assert created.returncode == 0, created.stderr
    port = free_port()
    s = Stack(url=f"http://127.0.0.1:{port}", key=created.stdout.strip().splitlines()[-1], folder=tmp_path, env=env)
    commands = {
        "api": ["api", "--port", str(port)],
        "worker": ["worker", "--loglevel", "info", "--hostname", f"e2e-{os.getpid()}@%h"],
    }
    logs = []
    try:
        for name, args in commands.items():
            log = open(tmp_path / f"{name}.log", "w")
            logs.append(log)
            s.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "service.commands.cli", *args],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready():
            s.check_alive()
            try:
                return httpx.get(f"{s.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30, "the API to be ready", interval=0.2)
        yield s
    finally:
        codes = {name: stop(p) for name, p in s.procs.items()}
        for log in logs:
            log.close()
        print(f"exit codes: {codes}\n{s.logs()}")  # shown by pytest only when the test failed
        close_redis(broker)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done: -15 with that shutdown logged is clean
    assert codes.get("worker", 0) == 0, f"unclean exit: {codes}"
    assert codes.get("api", 0) in (0, -signal.SIGTERM), f"unclean exit: {codes}"
    if "api" in codes:
        assert "Finished server process" in (tmp_path / "api.log").read_text()


# ------------------------------------------------------------------------------------------------ SSE


@dataclass
class Sse:
    id: int | None
    event: str
    data: dict


def read_sse(
    client: httpx.Client, path: str, last_event_id: int | None = None, stop_after: str | None = None
) -> list[Sse]:
    """Events of an SSE stream, parsed from its lines; until the server ends it, or (closing the connection
    early) after the first event of kind `stop_after`."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    out: list[Sse] = []
    with client.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, list[str]] = {}
        for line in r.iter_lines():
            if line == "":  # dispatch
                if "data" in fields and fields.get("event") != ["state"]:  # stored events only; states are
                    eid = fields.get("id", [None])[-1]  # snapshots, tested elsewhere
                    out.append(
                        Sse(
                            id=int(eid) if eid is not None else None,
                            event=fields.get("event", ["message"])[-1],
                            data=json.loads("\n".join(fields["data"])),
                        )
                    )
                    if stop_after and out[-1].event == stop_after:
                        return out
                fields = {}
                continue
            if line.startswith(":"):
                continue  # comment: the opening line and keep-alives
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    return out


# ----------------------------------------------------------------------------------------------- test


def test_offline_distill_over_http_with_api_and_worker_processes(
    stack, tmp_path, tiny_teacher, tiny_student, tiny_text
):
    with stack.client(timeout=30) as c:
        run_job_over_http(c, stack, tmp_path, tiny_teacher, tiny_student, tiny_text)


def run_job_over_http(
    c: httpx.Client, stack: Stack, tmp_path: Path, tiny_teacher: Path, tiny_student: Path, tiny_text: dict[str, Path]
) -> None:
    ds = {}
    for split in ("train", "valid"):
        with open(tiny_text[split], "rb") as f:
            r = c.post("/v1/datasets", files={"file": (f"{split}.jsonl", f)}, data={"name": split})
        assert r.status_code == 201, r.text
        assert r.json()["format"] == "text"
        ds[split] = r.json()["id"]
    models = {}
    for name, path in (("teacher", tiny_teacher), ("student", tiny_student)):
        r = c.post("/v1/models", json={"name": name, "path": str(path)})
        assert r.status_code == 201, r.text
        models[name] = r.json()["id"]

    steps = 8
    spec = {
        "student": {"model": models["student"]},
        "teachers": [{"model": models["teacher"]}],
        "teacher_mode": "offline",
        "data": {"train": ds["train"], "valid": ds["valid"]},
        "loss": {"kind": "forward_kl", "top_k": 16},
        "adapter": {"type": "lora", "rank": 4, "scale": 10.0},
        "training": {
            "steps": steps,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "max_seq_len": 48,
            "eval_every": 4,
            "checkpoint_every": 4,
            "eval_batches": 2,
            "seed": 3,
        },
    }
    r = c.post("/v1/jobs", json={"kind": "distill", "spec": spec}, headers={"Idempotency-Key": "e2e-1"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["status"] == "queued"

    # the teacher cache jobs (train and valid) the offline job waits for: they run first, on the same worker
    caches = c.get("/v1/jobs", params={"kind": "teacher_cache"}).json()["data"]
    assert sorted(j["spec"]["data"] for j in caches) == sorted(ds.values()), caches

    # follow the job over SSE; drop the connection after `started`, then resume with Last-Event-ID
    stream = f"/v1/jobs/{job_id}/events/stream"
    first = read_sse(c, stream, stop_after="started")
    assert [e.event for e in first][0] == "created" and first[-1].event == "started", first
    stack.check_alive()
    rest = read_sse(c, stream, last_event_id=first[-1].id)
    assert rest, "nothing after `started`"
    assert all(e.id > first[-1].id for e in rest), "events before Last-Event-ID came again"
    seen = first + rest
    ids = [e.id for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    kinds = [e.event for e in seen]
    assert kinds[-1] == "succeeded", kinds
    order = ["created", "started", "preflight", "data", "teacher_cache", "student", "done", "succeeded"]
    assert [k for k in dict.fromkeys(kinds) if k in order] == order, kinds  # in order of first appearance
    assert all(e.data["id"] == e.id and e.data["kind"] == e.event for e in seen)
    cache_hit = next(e for e in seen if e.event == "teacher_cache")
    assert cache_hit.data["data"].get("hit") is True, cache_hit  # built by the cache job, reused here
    # the stream carried exactly what the events list holds
    listed = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["id"] for e in listed] == ids

    # the cache jobs built the caches, reporting their progress
    for cache in caches:
        cache_kinds = [e["kind"] for e in c.get(f"/v1/jobs/{cache['id']}/events").json()["data"]]
        assert "cache_progress" in cache_kinds and cache_kinds[-1] == "succeeded", cache_kinds
        assert c.get(f"/v1/jobs/{cache['id']}").json()["status"] == "succeeded"

    job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert job["started_at"] and job["finished_at"] and job["error"] is None
    assert job["progress"]["step"] == steps and job["progress"]["total_steps"] == steps
    assert job["progress"]["fraction"] == 1
    summary = job["summary"]
    assert summary["best"]["step"] in (4, 8) and summary["train"]["steps"] == steps, summary
    assert summary["last"]["step"] == steps and "val_kl" in summary["final"], summary

    loss = c.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss"}).json()["data"]
    assert [m["step"] for m in loss] == list(range(1, steps + 1)), loss
    assert all(m["name"] == "loss" for m in loss)
    val_kl = c.get(f"/v1/jobs/{job_id}/metrics", params={"name": "val_kl"}).json()["data"]
    assert {4, 8} <= {m["step"] for m in val_kl}, val_kl
    checkpoints = c.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert checkpoints and checkpoints[-1]["step"] == steps, checkpoints

    artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    adapter_dir = tmp_path / "download"
    adapter_dir.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        r = c.get(f"/v1/artifacts/{artifacts[name]['id']}/content")
        assert r.status_code == 200, r.text
        digest = hashlib.sha256(r.content).hexdigest()
        assert r.headers["x-content-sha256"] == digest == artifacts[name]["sha256"]
        (adapter_dir / name).write_bytes(r.content)

    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_student), adapter_path=str(adapter_dir))
    assert model is not None and tokenizer is not None
    stack.check_alive()
