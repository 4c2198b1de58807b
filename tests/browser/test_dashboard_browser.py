"""The dashboard in a real browser: Debian's chromium, driven by playwright (never a browser it downloads),
against `distillery-server dev` (the API and a real Celery worker on SQLite and the SQLite broker).

A person's path through it: enter an API key, fill in the new-job form (editing the request body too), see the
estimate, submit a small distillation on the tiny models, watch its loss chart grow while it runs, see it
succeed with checkpoints and artifacts, open its results (the runs table and its benchmark child's table), and
find none of it with another project's key. Screenshots go to the test's temp dir. Skipped, saying why, only
where chromium or playwright is missing (`.ci/run` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.services import ROOT, free_port, wait_for

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("DISTILLERY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Dev:
    url: str
    key: str
    other_key: str
    folder: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def logs(self) -> str:
        return (self.folder / "dev.log").read_text(errors="replace")[-8000:]


def cli(*args: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.commands.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def dev(tmp_path) -> Iterator[Dev]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        DISTILLERY_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        DISTILLERY_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        DISTILLERY_CACHE_DIR=str(tmp_path / "cache"),
        DISTILLERY_EVENTS_POLL_SECONDS="0.2",
        OPENBLAS_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    cli("migrate", env=env)
    key = cli("keys", "create", "--project", "browser", env=env)
    other_key = cli("keys", "create", "--project", "elsewhere", env=env)
    port = free_port()
    log = open(tmp_path / "dev.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.commands.cli", "dev", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    d = Dev(url=f"http://127.0.0.1:{port}", key=key, other_key=other_key, folder=tmp_path)

    def ready() -> bool:
        assert proc.poll() is None, d.logs()
        try:
            return httpx.get(f"{d.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "distillery-server dev to be ready", interval=0.3)
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(d.logs())  # shown by pytest only when the test failed


@pytest.fixture
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def register_inputs(d: Dev, teacher: Path, student: Path, text: dict[str, Path]) -> dict[str, str]:
    ids = {}
    with d.client() as c:
        for split, path in text.items():
            with open(path, "rb") as f:
                r = c.post("/v1/datasets", files={"file": (f"{split}.jsonl", f)}, data={"name": split})
            assert r.status_code == 201, r.text
            ids[split] = r.json()["id"]
        for name, path in (("teacher", teacher), ("student", student)):
            r = c.post("/v1/models", json={"name": name, "path": str(path)})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
    return ids


def test_dashboard_login_submit_live_chart_results(dev, browser, tmp_path, tiny_teacher, tiny_student, tiny_text):
    ids = register_inputs(dev, tiny_teacher, tiny_student, tiny_text)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((dev.url, "blob:", "data:")) else outside.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # log in once: the key is kept (a reload stays logged in)
    page.goto(dev.url + "/")
    page.fill("#api-key", "dst_wrong_key")
    page.click("#login-button")
    page.wait_for_selector("#login-error:has-text('Refused')")
    page.fill("#api-key", dev.key)
    page.click("#login-button")
    page.wait_for_selector("#jobs-table")
    page.reload()
    page.wait_for_selector("#jobs-body:has-text('No jobs match')")

    # the new-job form: student, teacher, datasets, evaluation; then the body edited by hand
    page.click("a[data-page=new]")
    page.wait_for_selector("#f-student")
    page.select_option("#f-student", ids["student"])
    for box in page.query_selector_all("#f-teachers input[type=checkbox]"):
        box.set_checked(box.get_attribute("value") == ids["teacher"])
    page.select_option("#f-train", ids["train"])
    page.select_option("#f-valid", ids["valid"])
    page.select_option("#f-evaluate", ids["valid"])
    page.fill("#f-steps", "150")
    page.fill("#f-lr", "0.001")
    body = json.loads(page.input_value("#job-body"))
    assert body["spec"]["student"] == {"model": ids["student"]} and body["spec"]["teachers"] == [
        {"model": ids["teacher"]}
    ]
    body["spec"]["training"].update(batch_size=2, max_seq_len=64, eval_every=25, checkpoint_every=50)
    body["spec"]["loss"] = {"kind": "forward_kl", "top_k": 16}
    page.fill("#job-body", json.dumps(body, indent=2))
    page.wait_for_selector("#est-caches:has-text('built first')")  # the estimate: two caches to build
    assert page.inner_text("#est-tokens") == f"{150 * 2 * 64:,}"
    page.screenshot(path=str(tmp_path / "new-job.png"))
    page.click("#submit-job")

    # the job's page, live: the loss chart grows while it runs
    page.wait_for_url("**/#/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        points = int(page.get_attribute("#chart-loss", "data-points") or 0)
        if not seen or points != seen[-1]:
            seen.append(points)
        status = page.get_attribute("#job-head .badge", "data-status")
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert status == "succeeded", page.inner_text("#job-head") + "\n" + page.inner_text("#event-log")
    wait_for(lambda: int(page.get_attribute("#chart-loss", "data-points") or 0) >= 150, 30, "the whole loss curve")
    grew = [p for p in seen if 0 < p < 150]
    assert grew, f"the loss chart never showed a partial run: {seen}"
    assert int(page.get_attribute("#chart-val", "data-points")) >= 2  # step 0 and later evaluations
    page.wait_for_selector("#artifacts:has-text('adapters.safetensors')")
    page.wait_for_selector("#checkpoints td")
    log = page.inner_text("#event-log")
    assert "done" in log
    page.screenshot(path=str(tmp_path / "job.png"), full_page=True)

    # its results: the run's table, and its benchmark child's table once that has run
    with dev.client() as c:
        child = c.get("/v1/jobs", params={"parent_id": job_id}).json()["data"][0]
        wait_for(
            lambda: c.get(f"/v1/jobs/{child['id']}").json()["status"] in ("succeeded", "failed"),
            300,
            "the benchmark child",
            interval=1,
        )
        assert c.get(f"/v1/jobs/{child['id']}").json()["status"] == "succeeded"
    page.reload()
    page.click("#open-results")
    page.wait_for_selector(f"#runs-table tr[data-job='{job_id}']")
    page.wait_for_selector(f".bench[data-job='{child['id']}'] .bench-table")
    table = page.inner_text(f".bench[data-job='{child['id']}'] .bench-table")
    assert "distilled" in table and "reference" in table
    page.wait_for_selector("#compare-val canvas")
    page.screenshot(path=str(tmp_path / "results.png"), full_page=True)

    # another project's key sees none of it
    page.click("#logout")
    page.goto(f"{dev.url}/#/jobs")
    page.fill("#api-key", dev.other_key)
    page.click("#login-button")
    page.wait_for_selector("#jobs-body:has-text('No jobs match')")
    page.goto(f"{dev.url}/#/jobs/{job_id}")
    page.wait_for_selector("#job-head .error")
    assert "not found" in page.inner_text("#job-head").lower() or "no job" in page.inner_text("#job-head").lower()

    assert not outside, f"the page fetched from outside this server: {outside}"
    assert not errors, f"script errors: {errors}"
    for name in ("new-job.png", "job.png", "results.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    print(f"screenshots in {tmp_path}")
