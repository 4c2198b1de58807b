"""The `distillery` command line as a person at an 80-column terminal and a script meet it, against the real API
process (tests/clients/conftest.py): full ids, a progress line that fits, consistent `status`, the benchmark
table, `--wait` following the evaluation, which jobs a queued job waits on, errors that name the flag, variable
or file to fix (as JSON under `--json`), broken pipes, and `distillery login`."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from distillery._progress import status_line
from distillery.types import JobState
from service.core.db.models import Job, StepMetric
from tests.clients.test_cli import job_file
from tests.helpers.services import free_port

WIDTH = 80  # what capsys gives rich (not a terminal, no COLUMNS): the narrow terminal of the issue


@pytest.fixture(scope="module")
def ids(server, tiny_text, tiny_teacher, tiny_student):
    with server.client() as c:
        return {
            "dataset": c.datasets.upload(tiny_text["train"], name="u-train").id,
            "valid": c.datasets.upload(tiny_text["valid"], name="u-valid").id,
            "teacher": c.models.add(tiny_teacher, name="u-teacher").id,
            "student": c.models.add(tiny_student, name="u-student").id,
        }


def set_row(server, job_id: str, **values) -> None:
    with server.db() as session:
        job = session.get(Job, job_id)
        for k, v in values.items():
            setattr(job, k, v)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_progress_line_fits_80_columns_with_step_bar_rate_and_eta(server, client):
    job_id = server.insert_job(total_steps=2000)
    server.set_progress(job_id, 1234, loss=2.31456, val_kl=0.51234, tokens_per_second=3456.7)
    set_row(server, job_id, eta_seconds=3725.0)
    state = JobState.of(client.jobs.get(job_id))
    for width in (80, 60):
        console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
        console.print(status_line("distill", state, width - 1, None, 75.0))
        text = console.export_text()
        assert len(lines_of(text)) == 1, text
        line = lines_of(text)[0]
        assert len(line) <= width
        assert line.startswith("running ") and "1234/2000" in line and "3457 tok/s" in line and "ETA 1:02:05" in line
        assert "━" in line  # the bar itself
    assert "loss 2.315" in line or "loss" not in line  # at 60 columns the loss may go, never the rest
    server.finish(job_id)

    # a teacher cache counts tokens, at its own rate
    cache = server.insert_job(kind="teacher_cache", total_steps=250_000)
    server.set_progress(cache, 100_000)
    state = JobState.of(client.jobs.get(cache))
    console = Console(width=WIDTH, file=io.StringIO(), record=True, color_system=None)
    console.print(status_line("teacher_cache", state, WIDTH - 1, 5000.0, 3.0))
    line = lines_of(console.export_text())[0]
    assert "100.0K/250.0K" in line and "5000 tok/s" in line and "ETA" in line and len(line) <= WIDTH
    server.finish(cache)


def test_jobs_shows_full_ids_and_the_error_below_them(cli, server):
    job_id = server.insert_job(status="queued")
    server.finish(job_id, "failed", error_code="user_error", error_message="data: train.jsonl:3: " + "bad " * 40)
    code, out, _ = cli("jobs", "--limit", "5")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(job_id))
    assert row.split()[0] == job_id and "failed" in row  # the whole id, copyable
    assert all(len(line) <= WIDTH for line in out.splitlines()), out
    error_line = out.splitlines()[out.splitlines().index(row) + 1]
    assert error_line.strip().startswith("user_error: data: train.jsonl:3: bad") and error_line.endswith("…")
    code, out, _ = cli("jobs", "--limit", "5", "--wide")
    assert code == 0 and ("bad " * 40).strip() in out
    code, out, _ = cli("jobs", "-q", "--limit", "3")
    assert code == 0 and all(line.startswith("job_") for line in out.splitlines()) and job_id in out.splitlines()


def test_status_shows_the_same_metrics_running_cancelled_or_succeeded(cli, server):
    flat = {
        "loss": 2.5,
        "lr": 1e-4,
        "target_tokens": 900,
        "tokens": 1000,
        "tokens_per_second": 321.0,
        "grad_norm": 0.9,
        "stage": "main",
        "val_kl": 0.61,
        "val_js": 0.1,
        "val_ce": 3.0,
        "val_ppl": 20.1,
        "val_top1_agreement": 0.42,
        "val_top5_agreement": 0.7,
        "student_entropy": 2.0,
        "teacher_entropy": 1.9,
        "val_tokens": 400,
        "eval_seconds": 0.5,
        "update_seconds": 0.2,
    }
    cancelled = server.insert_job()
    server.set_progress(cancelled, 12, **flat)
    server.finish(cancelled, "cancelled", error_message="cancelled")
    code, out, _ = cli("status", cancelled)
    assert code == 0
    assert "val KL" in out and "0.61" in out and "loss" in out and "tokens/s" in out
    assert "grad_norm" not in out and "student_entropy" not in out and "val_js" not in out  # not 20 flat ones

    succeeded = server.insert_job()
    server.finish(
        succeeded,
        "succeeded",
        summary={
            "initial": {"val_kl": 0.9, "val_ppl": 40.0, "val_top1_agreement": 0.3},
            "final": {"val_kl": 0.4, "val_ppl": 25.0, "val_top1_agreement": 0.5},
            "best": {"step": 40, "val_kl": 0.4},
            "shipped": "trained",
            "learning_rate": 1e-4,
            "train": {"steps": 40, "tokens": 9000, "tokens_per_second": 300.0, "wall_seconds": 30.0},
        },
    )
    code, out, _ = cli("status", succeeded)
    assert code == 0
    text = " ".join(out.split())
    assert "val KL 0.9 → 0.4" in text and "val ppl 40 → 25" in text and "val top-1 30.0% → 50.0%" in text
    assert "tokens/s 300" in text and "best step 40 (trained)" in text


def test_metrics_with_an_unknown_name_is_an_error_naming_the_known_ones(cli, server):
    job_id = server.insert_job()
    with server.db() as session:
        session.add_all(
            StepMetric(job_id=job_id, step=s, kind="train", name=n, value=1.0 / s)
            for s in (1, 2)
            for n in ("loss", "lr")
        )
    code, out, _ = cli("metrics", job_id, "--name", "loss", "--json")
    assert code == 0 and [m["step"] for m in json.loads(out)] == [1, 2]
    code, out, err = cli("metrics", job_id, "--name", "nope")
    assert code == 1 and out == ""
    assert err.strip() == f"error: --name nope: job {job_id} has no metric 'nope'; it has: loss, lr"
    code, out, err = cli("metrics", job_id, "--name", "nope", "--json")
    assert code == 1 and out == ""
    problem = json.loads(err)["error"]
    assert problem["exit_code"] == 1 and "'nope'" in problem["message"]
    server.finish(job_id)


def test_download_refusals_create_nothing_and_name_the_flag(cli, server, tmp_path):
    code, _, err = cli("download", "job_nope", "--out", str(tmp_path / "x"))
    assert code == 1 and "404" in err and "job_nope" in err
    assert not (tmp_path / "x").exists()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    job_id = server.insert_job()
    server.insert_artifact(job_id, "adapters.safetensors", b"\x00" * 10)
    server.finish(job_id)
    code, _, err = cli("download", job_id, "--out", str(afile))
    assert code == 1 and err.strip() == f"error: --out {afile}: is a file, not a folder; name a folder to download into"
    assert "Errno" not in err and afile.read_text() == "mine"
    code, out, _ = cli("download", job_id, "--out", str(tmp_path / "dl"), "--json")
    assert code == 0 and json.loads(out) == [str(tmp_path / "dl" / "adapters.safetensors")]


def test_logs_json_into_a_pipe_closed_early_ends_quietly(server):
    job_id = server.insert_job()
    server.add_events(job_id, 1500)  # ~200 KB of JSON: more than a pipe holds
    exe = Path(sys.executable).parent / "distillery"
    env = {**os.environ, "DISTILLERY_BASE_URL": server.url, "DISTILLERY_API_KEY": server.key}
    r = subprocess.run(
        ["bash", "-c", f'"{exe}" logs {job_id} --json | head -c 100 >/dev/null; echo "rc=${{PIPESTATUS[0]}}" >&2'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stderr.strip() == "rc=141", r.stderr  # no traceback, no "BrokenPipeError", no "Exception ignored"
    server.finish(job_id)


def test_dataset_errors_print_each_bad_line_once_and_json_errors_are_json(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n{"text": 3}\nnot json\n')
    code, out, err = cli("datasets", "upload", str(bad))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == "error: 422: bad.jsonl: 3 invalid lines:"
    assert [line.split(":")[0:2] for line in lines[1:]] == [
        ["  bad.jsonl", "2"],
        ["  bad.jsonl", "3"],
        ["  bad.jsonl", "4"],
    ]
    for message in ("needs {'text'}", "must be a string", "invalid JSON"):
        assert err.count(message) == 1, message

    code, out, err = cli("datasets", "upload", str(bad), "--json")
    assert code == 1 and out == ""
    problem = json.loads(err)["error"]  # one JSON object, on one line
    assert len(err.strip().splitlines()) == 1
    assert problem["status"] == 422 and problem["exit_code"] == 1
    assert [e["line"] for e in problem["errors"]] == [2, 3, 4]
    code, out, err = cli("status", "job_nope", "--json")
    assert code == 1 and out == "" and json.loads(err)["error"]["status"] == 404


def test_errors_name_the_variable_or_flag_to_fix(cli, server, monkeypatch):
    monkeypatch.delenv("DISTILLERY_API_KEY")
    code, _, err = cli("jobs")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "no API key" in err and "$DISTILLERY_API_KEY" in err and "--api-key" in err and "distillery login" in err
    monkeypatch.setenv("DISTILLERY_API_KEY", "dst_wrong")
    code, _, err = cli("jobs")
    assert code == 1 and "the API key from $DISTILLERY_API_KEY was refused" in err
    code, _, err = cli("jobs", "--api-key", "dst_wrong2")
    assert code == 1 and "the API key from --api-key was refused" in err
    monkeypatch.setenv("DISTILLERY_BASE_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = cli("jobs", "--json")
    assert code == 4 and "$DISTILLERY_BASE_URL" in json.loads(err)["error"]["message"]


def test_login_stores_the_key_0600_and_the_variable_still_wins(cli, server, monkeypatch, tmp_path):
    config_home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv("DISTILLERY_API_KEY")
    monkeypatch.delenv("DISTILLERY_BASE_URL")
    path = config_home / "distillery" / "config.yaml"

    code, _, err = cli("login", "--base-url", server.url, "--api-key", "dst_wrong")
    assert code == 1 and "refused this API key; nothing was stored" in err and not path.exists()

    monkeypatch.setattr(sys, "stdin", io.StringIO(server.key + "\n"))  # piped in, as `echo $KEY | distillery login`
    code, out, _ = cli("login", "--base-url", server.url)
    assert code == 0 and str(path) in out and "0600" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text()) == {"api_key": server.key, "base_url": server.url}

    code, out, _ = cli("jobs", "--json")  # no variable, no flag: the stored key and URL
    assert code == 0 and isinstance(json.loads(out), list)
    code, out, _ = cli("config", "show", "--json")
    shown = json.loads(out)
    assert shown["api_key_from"] == f"the config file {path}" and server.key not in out
    monkeypatch.setenv("DISTILLERY_API_KEY", "dst_from_the_env")  # the variable wins over the file
    code, _, err = cli("jobs")
    assert code == 1 and "the API key from $DISTILLERY_API_KEY was refused" in err

    code, out, _ = cli("config", "set", "timeout", "30")
    assert code == 0 and yaml.safe_load(path.read_text())["timeout"] == 30.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, _, err = cli("config", "set", "timeout", "soon")
    assert code == 1 and "timeout: expected a number" in err


def finish_benchmark(server, job_id: str, **extra) -> None:
    metrics = {
        "teacher": {"ppl": 100.0, "kl": 0.0, "top1_agreement": 1.0, "decode_tokens_per_second": 12.6},
        "student (before)": {"ppl": 316.0, "kl": 1.4541, "top1_agreement": 0.364, "decode_tokens_per_second": 15.6},
        "distilled": {"ppl": 139.0, "kl": 0.6962, "top1_agreement": 0.533, "decode_tokens_per_second": 14.5},
    }
    with server.db() as session:
        session.get(Job, job_id).status = "running"
    server.finish(job_id, "succeeded", summary={"reference": "teacher", "metrics": metrics}, **extra)


def evaluate_file(tmp_path: Path, ids: dict) -> Path:
    path = job_file(tmp_path, ids)
    body = yaml.safe_load(path.read_text())
    body["spec"]["evaluate"] = {"data": {"text": ids["valid"]}}
    path.write_text(yaml.safe_dump(body))
    return path


def test_results_renders_the_benchmark_table(cli, server, ids, tmp_path):
    code, out, _ = cli("submit", str(evaluate_file(tmp_path, ids)), "--json")
    parent = json.loads(out)["id"]
    code, out, _ = cli("jobs", "--kind", "benchmark", "--json")
    child = next(j["id"] for j in json.loads(out) if j["parent_id"] == parent)
    code, _, err = cli("results", parent)
    assert code == 1 and f"benchmark job {child} is queued" in err
    finish_benchmark(server, child)
    for job_id in (child, parent):  # a distill job's results are its evaluation's
        code, out, _ = cli("results", job_id)
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].split() == ["model", "ppl", "KL", "top-1", "decode", "t/s"]
        assert lines[3].split() == ["distilled", "139", "0.6962", "53.3%", "14.5"]
        assert all(len(line) <= WIDTH for line in lines)
    code, out, _ = cli("results", child, "--json")
    assert code == 0 and json.loads(out)["metrics"]["distilled"]["kl"] == 0.6962
    job_id = server.insert_job(kind="teacher_cache")
    code, _, err = cli("results", job_id)
    assert code == 1 and "is a teacher_cache job" in err
    server.finish(parent)


def test_submit_wait_follows_the_evaluation_to_its_end(cli, server, ids, tmp_path):
    from sqlalchemy import select

    finished = {}

    def worker():
        for _ in range(300):
            with server.db() as session:
                jobs = session.scalars(select(Job).where(Job.kind == "benchmark", Job.status == "queued")).all()
                mine = [j for j in jobs if j.parent_id and session.get(Job, j.parent_id).status == "queued"]
            if mine:
                break
            time.sleep(0.02)
        child = mine[-1]
        with server.db() as session:
            session.get(Job, child.parent_id).status = "running"
        server.finish(child.parent_id, "succeeded")
        time.sleep(1.0)  # the distillation is over; its evaluation has not even started
        finish_benchmark(server, child.id)
        finished["at"] = time.monotonic()

    thread = threading.Thread(target=worker)
    thread.start()
    code, out, err = cli("submit", str(evaluate_file(tmp_path, ids)), "--wait", "--json")
    returned = time.monotonic()
    thread.join()
    job = json.loads(out)
    assert code == 0, err
    assert job["status"] == "succeeded" and [c["status"] for c in job["children"]] == ["succeeded"]
    assert returned >= finished["at"]
    code, out, err = cli("wait", job["id"])
    assert code == 0 and "benchmark job" in out and "distilled" in out and "0.6962" in out


def test_a_queued_job_says_which_jobs_it_waits_on(cli, server, ids, tmp_path):
    path = job_file(tmp_path, ids)
    body = yaml.safe_load(path.read_text())
    body["spec"]["teacher_mode"] = "offline"
    path.write_text(yaml.safe_dump(body))
    code, out, _ = cli("submit", str(path), "--json")
    job = json.loads(out)
    waits = job["waiting_on"]
    assert code == 0 and [w["kind"] for w in waits] == ["teacher_cache"] and waits[0]["status"] == "queued"
    cache = waits[0]["id"]
    set_row(server, cache, status="running", progress_step=250, total_steps=1000)
    code, out, _ = cli("status", job["id"])
    assert code == 0 and f"waiting on teacher_cache job {cache} (running 25%)" in " ".join(out.split())
    code, out, _ = cli("jobs", "--limit", "3")
    row = out.splitlines().index(next(line for line in out.splitlines() if line.startswith(job["id"])))
    assert f"waiting on teacher_cache {cache} running 25%" in out.splitlines()[row + 1]
    server.finish(cache)
    code, out, _ = cli("status", job["id"], "--json")
    assert json.loads(out)["waiting_on"] == []
    server.finish(job["id"], "cancelled")
