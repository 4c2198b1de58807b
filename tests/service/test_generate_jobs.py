"""`generate` jobs (the playground) at the API: the spec validated with the field named, every model and job
id checked against the caller's project, and a distill job that has not succeeded yet makes the job wait."""

from __future__ import annotations

from service.core import lifecycle
from service.core.db.models import Job
from tests.service.factories import count, insert_job, register_model, setup_distill
from tests.service.test_jobs import assert_refused, post_job


def test_a_generate_job_is_created_with_its_defaults_and_sent(api):
    spec = setup_distill(api)
    teacher, student = spec["teachers"][0]["model"], spec["student"]["model"]
    body = {
        "prompt": "Once upon a time",
        "models": [{"label": "teacher", "model": teacher}, {"label": "s", "model": student}],
    }
    r = post_job(api, "generate", body)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "generate" and job["status"] == "queued"
    assert {k: job["spec"][k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 128,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
    }
    assert api.queue_length() == 1  # nothing to wait for: sent at once
    listed = api.client.get("/v1/jobs", params={"kind": "generate"}, headers=api.headers).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    chat = {**body, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert post_job(api, "generate", chat).status_code == 201


def test_bad_generate_specs_are_refused_naming_the_field(api):
    spec = setup_distill(api)
    model = spec["student"]["model"]
    ok = {"prompt": "Hello", "models": [{"label": "a", "model": model}]}
    cases = [
        ({**ok, "prompt": "   "}, "spec.prompt", "empty"),
        ({**ok, "prompt": []}, "spec.prompt", "empty list"),
        ({**ok, "prompt": 7}, "spec.prompt", "a string or a list of messages"),
        ({**ok, "prompt": [{"role": "robot", "content": "x"}]}, "spec.prompt", "0.role"),
        ({**ok, "prompt": "x" * 100_001}, "spec.prompt", "at most 100000"),
        ({**ok, "models": []}, "spec.models", "at least 1"),
        ({**ok, "models": [{"label": f"m{i}", "model": model} for i in range(9)]}, "spec.models", "at most 8"),
        (
            {**ok, "models": [{"label": "a", "model": model}, {"label": "a", "model": model}]},
            "spec.models",
            "duplicate",
        ),
        ({**ok, "models": [{"label": "a"}]}, "spec.models.0", "name a model"),
        ({**ok, "models": [{"label": "", "model": model}]}, "spec.models.0.label", ""),
        ({**ok, "models": [{"label": "a", "model": model, "student_of": "job_x"}]}, "spec.models.0", "student_of"),
        ({**ok, "max_tokens": 0}, "spec.max_tokens", "greater than or equal to 1"),
        ({**ok, "max_tokens": 4097}, "spec.max_tokens", "less than or equal to 4096"),
        ({**ok, "temperature": -1}, "spec.temperature", ""),
        ({**ok, "top_p": 0}, "spec.top_p", ""),
        ({**ok, "seed": -1}, "spec.seed", ""),
        ({**ok, "max_token": 5}, "spec.max_token", "Extra inputs"),
        ({"models": ok["models"]}, "spec.prompt", "required"),
    ]
    for body, field, words in cases:
        assert_refused(api, post_job(api, "generate", body), field, words)


def test_generate_ids_must_be_the_projects_own(api):
    spec = setup_distill(api)
    model = spec["student"]["model"]
    other_headers, other_project = api.other_project()
    foreign_model = register_model(api, "foreign", headers=other_headers)["id"]
    foreign_job = insert_job(api, project_id=other_project, status="succeeded")
    failed = insert_job(api, status="failed")
    cache = insert_job(api, status="succeeded", kind="teacher_cache")
    jobs = count(api, Job)
    for candidate, field, words in (
        ({"model": foreign_model}, "spec.models.1.model", "unknown model id"),
        ({"model": "/srv/models/x"}, "spec.models.1.model", "not paths"),
        ({"model": "mdl_nope"}, "spec.models.1.model", "unknown model id"),
        ({"adapter": foreign_job}, "spec.models.1.adapter", "unknown job id"),
        ({"student_of": foreign_job}, "spec.models.1.student_of", "unknown job id"),
        ({"model": model, "adapter": failed}, "spec.models.1.adapter", "failed distill job"),
        ({"student_of": cache}, "spec.models.1.student_of", "succeeded teacher_cache job"),
    ):
        body = {"prompt": "Hi", "models": [{"label": "a", "model": model}, {"label": "b", **candidate}]}
        assert_refused(api, post_job(api, "generate", body), field, words, jobs=jobs)
    # the other project cannot use this project's model either
    body = {"prompt": "Hi", "models": [{"label": "a", "model": model}]}
    r = post_job(api, "generate", body, headers=other_headers)
    assert_refused(api, r, "spec.models.0.model", "unknown model", jobs=jobs)


def test_a_generate_job_waits_for_a_distill_job_still_to_run(api):
    spec = setup_distill(api)
    running = insert_job(api, status="running", spec=spec)
    done = insert_job(api, status="succeeded", spec=spec)
    body = {
        "prompt": "Hi",
        "models": [
            {"label": "teacher", "model": spec["teachers"][0]["model"]},
            {"label": "student (before)", "student_of": running},
            {"label": "distilled", "adapter": running},
            {"label": "older", "adapter": done},
        ],
    }
    sent = api.queue_length()
    r = post_job(api, "generate", body)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with api.db() as session:
        assert {d.id for d in lifecycle.dependencies(session, job_id)} == {running}
        assert session.get(Job, job_id).enqueued_at is None
    assert api.queue_length() == sent
    waiting = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()["waiting_on"]
    assert [w["id"] for w in waiting] == [running]
