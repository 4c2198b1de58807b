"""The playground in a real browser (Debian's chromium, playwright) against `distillery-server dev`: pick a
distill job (its teacher, its student before and the distilled student are filled in), type a prompt, submit,
and see the three answers side by side, as the job's summary holds them, inserted as text. Skipped where
chromium or playwright is missing, like tests/browser/test_dashboard_browser.py, whose fixtures it uses."""

from __future__ import annotations

import pytest

from tests.browser.test_dashboard_browser import browser, dev, register_inputs  # noqa: F401 (fixtures)
from tests.helpers.services import wait_for

pytestmark = pytest.mark.browser


def test_playground_answers_side_by_side(dev, browser, tmp_path, tiny_teacher, tiny_student, tiny_text):  # noqa: F811
    ids = register_inputs(dev, tiny_teacher, tiny_student, tiny_text)
    spec = {
        "student": {"model": ids["student"]},
        "teachers": [{"model": ids["teacher"]}],
        "teacher_mode": "online",
        "data": {"train": ids["train"], "valid": ids["valid"]},
        "training": {"steps": 4, "batch_size": 2, "max_seq_len": 48, "learning_rate": 1e-3, "eval_every": 4},
    }
    with dev.client() as c:
        r = c.post("/v1/jobs", json={"kind": "distill", "spec": spec})
        assert r.status_code == 201, r.text
        distill_id = r.json()["id"]

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((dev.url, "blob:", "data:")) else outside.append(r.url))
    page.goto(dev.url + "/")
    page.fill("#api-key", dev.key)
    page.click("#login-button")
    page.wait_for_selector("#jobs-table")

    page.click("a[data-page=playground]")
    page.wait_for_selector(f"#pg-distill option[value='{distill_id}']", state="attached")
    page.select_option("#pg-distill", distill_id)
    labels = [i.input_value() for i in page.query_selector_all("#pg-models .pg-label")]
    assert labels == ["teacher", "student (before)", "distilled"]
    assert page.query_selector_all("#pg-models .pg-model")[0].input_value() == ids["teacher"]
    assert page.query_selector_all("#pg-models .pg-student-of")[1].input_value() == distill_id
    assert page.query_selector_all("#pg-models .pg-adapter")[2].input_value() == distill_id
    # a label is the user's text: it is shown as text, never parsed as HTML
    page.query_selector_all("#pg-models .pg-label")[0].fill("<b>teacher</b>")
    page.fill("#pg-prompt", "The built-in function")
    page.fill("#pg-max-tokens", "12")

    # a bad value comes back as the server's error naming the field
    page.fill("#pg-temperature", "-1")
    page.click("#pg-submit")
    page.wait_for_selector("#pg-errors:has-text('spec.temperature')")
    page.fill("#pg-temperature", "0")
    page.click("#pg-submit")
    page.wait_for_url("**/#/playground?job=job_*")
    job_id = page.url.rsplit("=", 1)[1]
    page.wait_for_selector("#pg-result .badge[data-status=succeeded]", timeout=240_000)
    page.wait_for_selector("#pg-answer-cards .answer")

    with dev.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "generate" and job["status"] == "succeeded", job
    answers = job["summary"]["answers"]
    cards = page.query_selector_all("#pg-answer-cards .answer")
    assert [card.query_selector("h3").inner_text() for card in cards] == [
        "<b>teacher</b>",
        "student (before)",
        "distilled",
    ]
    assert not page.query_selector("#pg-answer-cards b")
    for card, a in zip(cards, answers):
        assert card.query_selector(".answer-text").text_content() == a["text"]
        assert f"{a['tokens']} tokens" in card.inner_text()
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

    # the same answers on the job's own page; a reload of the playground shows the job again
    page.goto(f"{dev.url}/#/jobs/{job_id}")
    page.wait_for_selector("#job-summary .answer")
    assert len(page.query_selector_all("#job-summary .answer")) == 3
    page.goto(f"{dev.url}/#/playground?job={job_id}")
    wait_for(lambda: len(page.query_selector_all("#pg-answer-cards .answer")) == 3, 30, "the answers again")
    assert page.input_value("#pg-prompt") == "The built-in function"

    assert not outside, f"the page fetched from outside this server: {outside}"
    assert not errors, f"script errors: {errors}"
