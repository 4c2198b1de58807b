"""Real `distillery-server worker` processes on Redis (db 14) and a SQLite database, running jobs on tiny models.

Jobs are written as the API writes them (lifecycle.create_job, then a message per ready job). Workers run with
a 3 s lease and a 1 s sweep, so a killed worker's job is picked up by another within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.core import lifecycle
from service.core.db.models import Artifact, Checkpoint, Job, JobEvent, StepMetric, TeacherCacheRecord
from service.core.db.session import session_scope
from service.core.queue import make_celery, send
from tests.helpers import tiny
from tests.worker.conftest import wait_for

TERMINAL = lifecycle.TERMINAL


def distill_spec(student: str, teacher: str, train: str, valid: str, **training) -> dict:
    return {
        "student": {"model": student},
        "teachers": [{"model": teacher}],
        "teacher_mode": "offline",
        "data": {"train": train, "valid": valid},
        "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0, "top_k": 16},
        "adapter": {"type": "lora", "rank": 4, "scale": 10.0},
        "training": {
            "steps": 8,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "max_seq_len": 48,
            "eval_every": 4,
            "checkpoint_every": 4,
            "seed": 3,
            "eval_batches": 2,
            **training,
        },
    }


@pytest.fixture(scope="module")
def refs(service, tiny_teacher, tiny_student, tiny_text):
    return {
        "teacher": service.add_model(tiny_teacher, "teacher"),
        "student": service.add_model(tiny_student, "student"),
        "train": service.add_dataset(tiny_text["train"], "train"),
        "valid": service.add_dataset(tiny_text["valid"], "valid"),
    }


def job(service, job_id: str) -> Job:
    with session_scope(service.database_url) as s:
        return s.get(Job, job_id)


def wait_done(service, job_id: str, timeout: float = 90) -> Job:
    def ended():
        if not service.live_workers():
            raise AssertionError(f"no worker is running:\n{service.logs()}")
        return (j := job(service, job_id)).status in TERMINAL and j

    try:
        return wait_for(ended, timeout, f"job {job_id} to end")
    except AssertionError:
        print(service.logs())
        raise


def events(service, job_id: str) -> list[JobEvent]:
    with session_scope(service.database_url) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def loss_steps(service, job_id: str) -> list[int]:
    with session_scope(service.database_url) as s:
        return list(
            s.scalars(
                select(StepMetric.step)
                .where(StepMetric.job_id == job_id, StepMetric.name == "loss")
                .order_by(StepMetric.step)
            )
        )


def checkpoint_steps(service, job_id: str) -> list[int]:
    with session_scope(service.database_url) as s:
        return list(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def test_teacher_cache_then_offline_distill(service, refs, tiny_student):
    spec = distill_spec(refs["student"], refs["teacher"], refs["train"], refs["valid"])
    job_id = service.submit("distill", spec)
    with session_scope(service.database_url) as s:
        caches = [d.id for d in lifecycle.dependencies(s, job_id)]
    assert len(caches) == 2  # train and valid, one teacher

    done = wait_done(service, job_id)
    assert done.status == "succeeded", (done.error_code, done.error_message, service.logs())
    for cache_id in caches:
        cache_job = job(service, cache_id)
        assert cache_job.status == "succeeded"
        # a teacher cache's progress is its tokens, reported as a distill job's steps are (with an ETA)
        assert cache_job.progress_step == cache_job.total_steps == cache_job.summary["tokens"]
        assert cache_job.eta_seconds == 0.0
        assert cache_job.summary["tokens"] > 0 and cache_job.summary["bytes_per_token"] > 0
        assert cache_job.summary["reconstruction_kl"] is not None
    with session_scope(service.database_url) as s:
        records = s.scalars(select(TeacherCacheRecord)).all()
        assert {r.job_id for r in records} == set(caches)
        assert all(Path(r.path, "meta.json").is_file() and r.size_bytes > 0 for r in records)
        arts = {a.name: a for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}

    # the run, as recorded
    assert done.progress_step == 8 and done.total_steps == 8
    assert done.summary["final"]["val_kl"] < done.summary["initial"]["val_kl"]
    kinds = [e.kind for e in events(service, job_id)]
    assert kinds[:2] == ["created", "started"] and kinds[-1] == "succeeded"
    assert {"preflight", "data", "teacher_cache", "student", "done"} <= set(kinds)
    assert loss_steps(service, job_id) == list(range(1, 9))
    assert checkpoint_steps(service, job_id) == [4, 8]

    # the outputs, as artifacts: hashes match the files, internals are not published
    assert {"adapters.safetensors", "adapter_config.json", "summary.json", "metrics.jsonl"} <= set(arts)
    assert not any(n.startswith("checkpoints/") or n == "spec.json" for n in arts)
    import hashlib

    for a in arts.values():
        assert hashlib.sha256(Path(a.path).read_bytes()).hexdigest() == a.sha256
        assert Path(a.path).stat().st_size == a.size_bytes
    out_dir = Path(arts["adapters.safetensors"].path).parent
    assert json.loads((out_dir / "summary.json").read_text())["best"] == done.summary["best"]

    code = (
        "import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1], adapter_path=sys.argv[2]);"
        "print(repr(generate(m, t, prompt='The', max_tokens=4)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(tiny_student), str(out_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]


def test_teacher_caches_are_not_shared_between_projects(service, refs, tiny_teacher, tiny_student, tiny_text):
    """No side channel: the same teacher and data in another project build their own cache, and its events
    never say "hit" for a cache the first project built."""
    from tests.worker.conftest import make_project

    first = service.submit(
        "teacher_cache", {"teacher": refs["teacher"], "data": refs["train"], "top_k": 16, "max_seq_len": 48}
    )
    assert wait_done(service, first).status == "succeeded"
    mine = service.project_id
    service.project_id = make_project(service.database_url)
    try:
        teacher, data = service.add_model(tiny_teacher, "teacher"), service.add_dataset(tiny_text["train"], "train")
        other = service.submit("teacher_cache", {"teacher": teacher, "data": data, "top_k": 16, "max_seq_len": 48})
        done = wait_done(service, other)
    finally:
        service.project_id = mine
    assert done.status == "succeeded", done.error_message
    cache_events = [e for e in events(service, other) if e.kind == "teacher_cache"]
    assert cache_events and not any(e.data.get("hit") for e in cache_events)
    assert any("built" in e.message for e in cache_events)
    again = service.submit(
        "teacher_cache", {"teacher": refs["teacher"], "data": refs["train"], "top_k": 16, "max_seq_len": 48}
    )
    assert wait_done(service, again).status == "succeeded"
    # within a project the cache is found again: what the other project's events would have said
    assert any(e.data.get("hit") for e in events(service, again) if e.kind == "teacher_cache")


def test_user_error_fails_that_job_only(service, refs, tiny_root):
    bad = tiny.write_jsonl(tiny_root / "bad.jsonl", [{"text": "fine"}, {"nope": 1}])
    bad_id = service.add_dataset(bad, "bad")
    failing = service.submit(
        "teacher_cache", {"teacher": refs["teacher"], "data": bad_id, "top_k": 16, "max_seq_len": 48}
    )
    unknown = service.submit(
        "teacher_cache", {"teacher": "mdl_nope", "data": refs["train"], "top_k": 16, "max_seq_len": 48}
    )
    # an offline distill on the bad data: its cache job fails, and the failure reaches the distill job
    blocked = service.submit("distill", distill_spec(refs["student"], refs["teacher"], bad_id, refs["valid"]))
    fine = service.submit(
        "teacher_cache", {"teacher": refs["teacher"], "data": refs["valid"], "top_k": 16, "max_seq_len": 48}
    )

    failed = wait_done(service, failing)
    assert (failed.status, failed.error_code) == ("failed", "user_error")
    assert f"{bad_id}.jsonl:2:" in failed.error_message, failed.error_message  # the file and line at fault
    missing = wait_done(service, unknown)
    assert (missing.status, missing.error_code) == ("failed", "user_error") and "mdl_nope" in missing.error_message
    dependent = wait_done(service, blocked)
    assert (dependent.status, dependent.error_code) == ("failed", "user_error")
    assert "dependency failed" in dependent.error_message
    assert wait_done(service, fine).status == "succeeded"


def test_internal_error_is_recorded_with_its_traceback(service, refs, tiny_teacher, tiny_root):
    broken = tiny_root / "broken-teacher"
    if not broken.exists():
        shutil.copytree(tiny_teacher, broken)
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    job_id = service.submit(
        "teacher_cache",
        {"teacher": service.add_model(broken, "broken"), "data": refs["valid"], "top_k": 16, "max_seq_len": 48},
    )
    failed = wait_done(service, job_id)
    assert (failed.status, failed.error_code) == ("failed", "internal_error"), failed.error_message
    assert len(failed.error_message) < 600
    error = [e for e in events(service, job_id) if e.kind == "error"]
    assert error and "Traceback" in error[0].data["traceback"]


def test_job_sent_while_broker_down_runs_after_a_sweep(service, refs):
    down = make_celery("redis://127.0.0.1:1/0")  # nothing listens there
    attempts = []
    t0 = time.monotonic()
    job_id = service.submit(
        "teacher_cache",
        {"teacher": refs["teacher"], "data": refs["valid"], "top_k": 16, "max_seq_len": 48},
        send=lambda jid: attempts.append(send(jid, down)) or attempts[-1],
    )
    assert attempts == [False] and time.monotonic() - t0 < 10  # fails fast, and the job is stored unsent
    done = wait_done(service, job_id, timeout=60)
    assert done.status == "succeeded"
    assert done.enqueued_at is not None  # so a worker's sweeper sent it: the submitter never could


def test_cancel_running_job_is_prompt_and_keeps_checkpoint(service, refs):
    spec = distill_spec(
        refs["student"],
        refs["teacher"],
        refs["train"],
        refs["valid"],
        steps=100000,
        checkpoint_every=5,
        eval_every=100000,
    )
    job_id = service.submit("distill", spec)
    wait_for(lambda: checkpoint_steps(service, job_id), 90, "a first checkpoint")
    with session_scope(service.database_url) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
    t0 = time.monotonic()
    done = wait_done(service, job_id, timeout=15)
    assert done.status == "cancelled"
    assert time.monotonic() - t0 < 5, "cancellation took too long"
    assert checkpoint_steps(service, job_id)
    with session_scope(service.database_url) as s:
        paths = s.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id)).all()
    assert all(Path(p, "state.json").is_file() for p in paths)


def test_killed_worker_job_is_resumed_by_another(service, refs):
    service.ensure_worker()
    service.start_worker()
    spec = distill_spec(
        refs["student"], refs["teacher"], refs["train"], refs["valid"], steps=160, checkpoint_every=10, eval_every=80
    )
    job_id = service.submit("distill", spec)
    wait_for(lambda: checkpoint_steps(service, job_id), 90, "a first checkpoint")
    owner = job(service, job_id).lease_owner
    pid = int(owner.split(":")[1])
    victim = next(p for p in service.workers if p.pid == pid)
    os.kill(pid, signal.SIGKILL)
    victim.wait()
    assert job(service, job_id).status == "running", "the job ended before the kill; make it longer"

    done = wait_done(service, job_id, timeout=90)
    assert done.status == "succeeded", (done.error_message, service.logs())
    assert done.attempts == 2 and done.lease_owner is None
    evs = events(service, job_id)
    kinds = [e.kind for e in evs]
    assert "requeued" in kinds
    resumed = [e for e in evs if e.kind == "resumed" and "step" in e.data]
    assert len(resumed) == 1 and resumed[0].data["step"] >= 10
    assert loss_steps(service, job_id) == list(range(1, 161))  # every step once: none lost, none twice
    with session_scope(service.database_url) as s:
        evals = s.scalars(
            select(StepMetric.step)
            .where(StepMetric.job_id == job_id, StepMetric.name == "val_kl")
            .order_by(StepMetric.step)
        ).all()
        n_art = s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    assert evals == [0, 80, 160] and n_art >= 4


def freeze_outside_a_write(service, pid: int, tries: int = 30) -> None:
    """SIGSTOP the worker at a moment it holds no SQLite write lock: SQLite's lock is the whole file, held by the
    process until it commits, and no server can break it, so a worker frozen inside a write stops every writer
    (the other worker's sweeper included) until it wakes. PostgreSQL locks rows, and a frozen session there is
    the database's to time out; on it the first freeze is kept."""
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        if not service.database_url.startswith("sqlite"):
            return
        probe = sqlite3.connect(service.database_url.removeprefix("sqlite:///"), timeout=2)
        try:
            probe.execute("BEGIN IMMEDIATE")  # the write lock: free now, so the frozen worker holds none
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.2)
        finally:
            probe.close()
    raise AssertionError(f"worker {pid} held the database's write lock at each of {tries} tries")


def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(service, refs):
    """SIGSTOP the owner until another worker has taken the job over and run on, then SIGCONT it: the stale
    worker must not add metric rows, events or checkpoints, nor touch the new owner's files."""
    service.ensure_workers(2)
    spec = distill_spec(
        refs["student"], refs["teacher"], refs["train"], refs["valid"], steps=160, checkpoint_every=10, eval_every=80
    )
    job_id = service.submit("distill", spec)
    wait_for(lambda: checkpoint_steps(service, job_id), 90, "a first checkpoint")
    stale_owner = job(service, job_id).lease_owner
    pid = int(stale_owner.split(":")[1])
    freeze_outside_a_write(service, pid)
    try:
        try:
            taken = wait_for(
                lambda: (j := job(service, job_id)).attempts == 2 and j.status == "running" and j,
                30,
                "another worker to take the frozen worker's job",
            )
        except AssertionError as e:
            j = job(service, job_id)
            seen = [(ev.kind, ev.message) for ev in events(service, job_id)]
            raise AssertionError(
                f"{e}: {j.status}, attempt {j.attempts}, {j.lease_owner}; {seen}\n{service.logs()}"
            ) from e
        assert taken.lease_owner != stale_owner
        before = max(loss_steps(service, job_id))
        wait_for(lambda: max(loss_steps(service, job_id)) >= before + 5, 60, "the new owner to run on")
    finally:
        os.kill(pid, signal.SIGCONT)  # the stale worker wakes mid-step, its buffers full
    done = wait_done(service, job_id, timeout=120)
    assert done.status == "succeeded", (done.error_message, service.logs())
    assert done.attempts == 2
    assert loss_steps(service, job_id) == list(range(1, 161))  # every step once: the stale rows never landed
    with session_scope(service.database_url) as s:
        evals = s.scalars(
            select(StepMetric.step)
            .where(StepMetric.job_id == job_id, StepMetric.name == "val_kl")
            .order_by(StepMetric.step)
        ).all()
        paths = s.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id)).all()
        artifacts = s.scalars(select(Artifact.path).where(Artifact.job_id == job_id)).all()
    assert evals == [0, 80, 160]
    assert paths and all(Path(p, "state.json").is_file() and ".attempts" not in p for p in paths)
    assert artifacts and all(Path(p).is_file() and ".attempts" not in p for p in artifacts)
    job_dir = Path(artifacts[0]).parent
    while not (job_dir / "metrics.jsonl").is_file():
        job_dir = job_dir.parent
    steps = [
        json.loads(line)["step"]
        for line in (job_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 161))  # the published file is the owner's alone
    kinds = [e.kind for e in events(service, job_id)]
    assert kinds.count("done") == 1 and kinds.count("succeeded") == 1


def test_worker_shutdown_releases_its_job_to_another(service, refs):
    service.ensure_workers(2)
    spec = distill_spec(
        refs["student"],
        refs["teacher"],
        refs["train"],
        refs["valid"],
        steps=100000,
        checkpoint_every=5,
        eval_every=100000,
    )
    job_id = service.submit("distill", spec)
    wait_for(lambda: checkpoint_steps(service, job_id), 90, "a first checkpoint")
    pid = int(job(service, job_id).lease_owner.split(":")[1])
    stopping = next(p for p in service.workers if p.pid == pid)
    stopping.send_signal(signal.SIGTERM)  # warm shutdown: checkpoint, give the job back, exit
    assert stopping.wait(20) == 0
    assert "released" in [e.kind for e in events(service, job_id)]
    resumed = wait_for(
        lambda: (j := job(service, job_id)).attempts == 2 and j.status == "running" and j,
        30,
        "another worker to take the job",
    )
    assert int(resumed.lease_owner.split(":")[1]) != pid
    with session_scope(service.database_url) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
    assert wait_done(service, job_id, timeout=15).status == "cancelled"


def test_distill_continues_from_an_earlier_jobs_adapter(service, refs):
    spec = distill_spec(refs["student"], refs["teacher"], refs["train"], refs["valid"], steps=4)
    first = wait_done(service, service.submit("distill", spec))
    assert first.status == "succeeded"
    spec["student"]["adapter"] = first.id
    spec["training"]["seed"] = 4
    second = wait_done(service, service.submit("distill", spec))
    assert second.status == "succeeded", second.error_message
    # it started where the first one ended: its initial validation KL is the first one's final
    assert abs(second.summary["initial"]["val_kl"] - first.summary["final"]["val_kl"]) < 1e-3

    spec["student"]["adapter"] = refs["train"]  # not a job: the user's to fix
    bad = wait_done(service, service.submit("distill", spec))
    assert (bad.status, bad.error_code) == ("failed", "user_error") and "student.adapter" in bad.error_message


def test_distill_with_evaluate_runs_its_benchmark_child(service, refs, tiny_teacher):
    """A pruned student (keep_layers) distilled with `evaluate`: after the distill job succeeds, its benchmark
    child runs on the same worker and reports the teacher, the pruned student before training and after."""
    spec = distill_spec(refs["teacher"], refs["teacher"], refs["train"], refs["valid"])
    spec["student"]["keep_layers"] = [0, 2]
    spec["evaluate"] = {"data": {"text": refs["valid"]}, "speed": {"prompt_tokens": 8, "decode_tokens": 4}}
    parent_id = service.submit("distill", spec)
    with session_scope(service.database_url) as s:
        child_id = s.scalars(select(Job.id).where(Job.parent_id == parent_id)).one()
    done = wait_done(service, child_id, timeout=180)
    assert job(service, parent_id).status == "succeeded"
    assert done.status == "succeeded", (done.error_code, done.error_message, service.logs())
    with session_scope(service.database_url) as s:
        arts = {a.name: Path(a.path) for a in s.scalars(select(Artifact).where(Artifact.job_id == child_id))}
    assert {"report.json", "report.md", "quality.png", "training.png"} <= set(arts), sorted(arts)
    report = json.loads(arts["report.json"].read_text())
    rows = {c["label"]: c["metrics"] for c in report["candidates"]}
    assert list(rows) == ["reference", "student (before)", "distilled"]
    assert rows["reference"]["kl"] == 0 and rows["reference"]["top1_agreement"] == 1
    # the pruned student keeps 2 of 3 layers; distillation brought it closer to the teacher
    assert rows["student (before)"]["parameters"] < rows["reference"]["parameters"]
    assert rows["distilled"]["kl"] < rows["student (before)"]["kl"]
    assert rows["distilled"]["adapter_parameters"] > 0 and rows["distilled"]["decode_tokens_per_second"] > 0
    assert done.summary["metrics"]["distilled"]["kl"] == rows["distilled"]["kl"]
    assert "| distilled |" in arts["report.md"].read_text()
    # its progress counted every unit, the speed runs included, and reached the end only at the end
    assert done.total_steps and done.progress_step == done.total_steps and done.eta_seconds == 0.0


def test_cancel_during_the_learning_rate_search_ends_the_job(service, refs):
    """The search runs trials with no training step between them: the cancel is seen at a batch (a cancel
    point), not when the search is over."""
    spec = distill_spec(
        refs["student"],
        refs["teacher"],
        refs["train"],
        refs["valid"],
        steps=100000,
        learning_rate="auto",
        lr_search={"steps": 200, "rates": [1e-4, 3e-4, 1e-3]},
    )
    job_id = service.submit("distill", spec)
    wait_for(lambda: "lr_search" in [e.kind for e in events(service, job_id)], 90, "the learning-rate search")
    with session_scope(service.database_url) as s:
        lifecycle.request_cancel(s, s.get(Job, job_id))
    t0 = time.monotonic()
    done = wait_done(service, job_id, timeout=120)
    print(f"cancel during the learning-rate search: {time.monotonic() - t0:.2f} s to `cancelled`")
    assert done.status == "cancelled" and done.error_message == "cancelled"
    kinds = [e.kind for e in events(service, job_id)]
    assert kinds[-2:] == ["cancel_requested", "cancelled"]
    assert kinds.count("lr_trial") < 3  # the search was stopped within it, not run to its end
    assert loss_steps(service, job_id) == []  # nothing past the start was recorded


def test_benchmark_user_error_names_the_field(service, refs):
    spec = {
        "reference": refs["teacher"],
        "candidates": [{"label": "s", "model": refs["student"]}],
        "data": {"mcq": refs["valid"]},
    }  # a text dataset in the mcq slot
    job_id = service.submit("benchmark", spec)
    done = wait_done(service, job_id)
    assert done.status == "failed" and done.error_code == "user_error", done.error_message
    assert "data.mcq" in done.error_message


def test_compare_runs_its_arms_then_reports_them_side_by_side(service, refs, tiny_root):
    """A compare job's arms are ordinary distill jobs (teacher caches shared); the compare job runs when they
    have all finished and writes one table and chart of them."""
    service.ensure_worker()
    second = tiny.build_model(tiny_root / "teacher-b", tiny_root / "tokenizer", hidden=48, layers=2, seed=9)
    base = distill_spec(refs["student"], refs["teacher"], refs["train"], refs["valid"], steps=4)
    base["teachers"].append({"model": service.add_model(second, "teacher-b")})
    domains = {"prose": refs["valid"]}
    compare_id = service.submit("compare", {"base": base, "arms": ["single", "confidence"], "domains": domains})
    done = wait_done(service, compare_id, timeout=240)
    assert done.status == "succeeded", (done.error_message, service.logs())
    arms = done.summary["arms"]
    assert [a["arm"] for a in arms] == ["teacher 0", "teacher 1", "confidence"]
    assert all(a["status"] == "succeeded" and a["val_kl"][1] is not None for a in arms)
    assert len(arms[2]["teacher_weights"]) == 2 and arms[0]["teacher_weights"] is None  # one teacher: no mix
    with session_scope(service.database_url) as s:
        children = s.scalars(select(Job).where(Job.parent_id == compare_id)).all()
        assert {c.id for c in children} == {a["job_id"] for a in arms}
        assert all(c.finished_at <= done.started_at for c in children)  # it ran after its arms
        files = {Path(p).name: Path(p) for p in s.scalars(select(Artifact.path).where(Artifact.job_id == compare_id))}
    assert {"compare.json", "compare.md", "compare.png"} <= set(files)
    scored = done.summary["domains"]
    assert len(scored["teachers"]["prose"]) == 2  # each teacher's own perplexity on the domain
    for arm in ("teacher 0", "teacher 1", "confidence"):
        per = scored["arms"][arm]
        assert len(per["prose"]["kl"]) == 2 and per["overall"]["tokens"] == per["prose"]["tokens"] > 0
    # a teacher's own arm is closest to that teacher
    assert scored["arms"]["teacher 1"]["prose"]["kl"][1] < scored["arms"]["teacher 0"]["prose"]["kl"][1]
    table = files["compare.md"].read_text()
    assert "## Per domain" in table
    assert "| teacher 1 | 1 | fixed |" in table and "| confidence | 2 | confidence |" in table
    assert arms[1]["kl_to_teachers"][0] is None and arms[1]["kl_to_teachers"][1] == arms[1]["val_kl"][1]
    shutil.copy(files["compare.png"], tiny_root / "compare.png")  # for a person to look at
