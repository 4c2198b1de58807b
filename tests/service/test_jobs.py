"""Job creation: specs validated by the engine's models with fields named; every id checked against the
caller's project; the row committed before the broker is rung, and a dead broker fails nothing."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from service.core import lifecycle
from service.core.db.models import IdempotencyRecord, Job, JobDependency
from tests.service.conftest import closed_port, running_api
from tests.service.factories import count, finish_job, insert_job, register_model, setup_distill, upload_dataset

PROBLEM = "application/problem+json"


def post_job(api, kind, spec, headers=None, **extra):
    return api.client.post("/v1/jobs", headers=headers or api.headers, json={"kind": kind, "spec": spec, **extra})


def assert_refused(api, r, field: str, words: str = "", jobs: int = 0) -> None:
    """A 422 problem naming `field`, and still only `jobs` jobs in the database."""
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    fields = {e["field"]: e["message"] for e in body["errors"]}
    assert field in fields, body
    assert words in fields[field], body
    assert field in body["detail"]
    assert count(api, Job) == jobs


def test_offline_distill_creates_cache_jobs_and_enqueues_them(api):
    spec = setup_distill(api)
    r = post_job(api, "distill", spec)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["kind"] == "distill" and job["status"] == "queued" and job["id"].startswith("job_")
    assert job["spec"]["training"]["steps"] == 10 and job["spec"]["training"]["learning_rate"] == "auto"  # defaults
    assert job["progress"] == {"step": 0, "total_steps": 10, "fraction": 0.0, "eta_seconds": None}
    assert job["error"] is None and job["artifacts"] == [] and job["started_at"] is None
    with api.db() as session:
        caches = session.query(Job).filter_by(kind="teacher_cache").all()
        assert len(caches) == 1 and caches[0].enqueued_at is not None
        assert session.query(JobDependency).filter_by(job_id=job["id"]).count() == 1
        assert session.get(Job, job["id"]).enqueued_at is None  # waits for its cache
    assert api.queue_length() == 1

    # a second student over the same teacher and data reuses the cache job: nothing new to build
    r = post_job(api, "distill", spec)
    assert r.status_code == 201 and count(api, Job) == 3 and api.queue_length() == 1
    # once the cache has succeeded, a new distill job is ready at once and is sent
    finish_job(api, caches[0].id)
    assert post_job(api, "distill", spec).status_code == 201 and api.queue_length() == 2


def test_online_distill_teacher_cache_and_benchmark(api):
    spec = setup_distill(api)
    r = post_job(api, "distill", {**spec, "teacher_mode": "online"})
    assert r.status_code == 201 and api.queue_length() == 1
    with api.db() as session:
        assert session.get(Job, r.json()["id"]).enqueued_at is not None
    r = post_job(api, "teacher_cache", {"teacher": spec["teachers"][0]["model"], "data": spec["data"]["train"]})
    assert r.status_code == 201 and r.json()["spec"]["top_k"] == 64 and r.json()["progress"]["total_steps"] is None
    mcq = upload_dataset(api, b'{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n')
    bench = {
        "reference": spec["teachers"][0]["model"],
        "candidates": [{"label": "student", "model": spec["student"]["model"]}],
        "data": {"text": spec["data"]["train"], "mcq": mcq["id"]},
    }
    r = post_job(api, "benchmark", bench)
    assert r.status_code == 201, r.text
    assert api.queue_length() == 3


def test_benchmark_prompts_take_prompts_completions_or_chat(api):
    spec = setup_distill(api)
    prompts = upload_dataset(api, b'{"prompt": "Tell me about the sea."}\n')
    bench = {
        "reference": spec["teachers"][0]["model"],
        "candidates": [{"label": "student", "model": spec["student"]["model"]}],
        "data": {"prompts": spec["data"]["train"]},  # text data: no prompts in it
    }
    assert_refused(api, post_job(api, "benchmark", bench), "spec.data.prompts", "prompts or completions or chat")
    r = post_job(api, "benchmark", {**bench, "data": {"prompts": prompts["id"]}, "samples": {"max_new_tokens": 16}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["samples"]["max_new_tokens"] == 16
    evaluated = {**spec, "evaluate": {"data": {"prompts": prompts["id"]}, "samples": {"temperature": 0.0}}}
    r = post_job(api, "distill", evaluated)
    assert r.status_code == 201, r.text
    with api.db() as session:
        child = session.scalars(select(Job).where(Job.parent_id == r.json()["id"])).one()
        assert child.spec["data"]["prompts"] == prompts["id"] and child.spec["samples"]["temperature"] == 0.0


def test_prompts_datasets_train_only_on_policy_distills(api):
    spec = setup_distill(api)
    prompts = upload_dataset(api, b'{"prompt": "Tell me about the sea."}\n')
    assert prompts["format"] == "prompts"
    offline = {**spec, "data": {"train": prompts["id"]}}
    assert_refused(api, post_job(api, "distill", offline), "spec.data.train", "teacher_mode: on_policy")
    on_policy = {**offline, "teacher_mode": "on_policy", "loss": {"kind": "reverse_kl"}}
    mixed = {**on_policy, "on_policy": {"fraction": 0.5}}
    assert_refused(api, post_job(api, "distill", mixed), "spec.data.train", "on_policy.fraction 1")
    # held-out prompts with completions data for training, at any fraction
    valid = {**mixed, "data": {"train": spec["data"]["train"], "valid": prompts["id"]}}
    assert post_job(api, "distill", valid).status_code == 201
    r = post_job(api, "distill", {**on_policy, "data": {"train": prompts["id"], "valid": prompts["id"]}})
    assert r.status_code == 201, r.text
    assert count(api, Job) == 2


def test_distill_preference_data_must_be_pairs_of_the_project(api):
    spec = setup_distill(api)
    pairs = upload_dataset(api, b'{"prompt": "Hi.", "chosen": " Hello!", "rejected": " Go away."}\n' * 3)
    assert pairs["format"] == "preference"
    text = spec["data"]["train"]
    wrong = {**spec, "data": {**spec["data"], "preference": text}}
    assert_refused(api, post_job(api, "distill", wrong), "spec.data.preference", "needs preference")
    unknown = {**spec, "data": {**spec["data"], "preference": "ds_" + "0" * 24}}
    assert_refused(api, post_job(api, "distill", unknown), "spec.data.preference", "unknown dataset")
    no_pairs = {**spec, "loss": {"preference": {"weight": 1.0}}}
    assert_refused(api, post_job(api, "distill", no_pairs), "spec", "loss.preference needs data.preference")
    ok = {**spec, "data": {**spec["data"], "preference": pairs["id"]}, "loss": {"preference": {"weight": 0.5}}}
    r = post_job(api, "distill", ok)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["data"]["preference"] == pairs["id"]


def test_spec_validation_names_the_field(api):
    spec = setup_distill(api)
    assert_refused(
        api, post_job(api, "distill", {**spec, "training": {"steps": -5}}), "spec.training.steps", "greater than 0"
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "training": {"learning_rat": 0.1}}),
        "spec.training.learning_rat",
        "Extra inputs",
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "training": {"batch_size": "four"}}),
        "spec.training.batch_size",
        "integer",
    )
    assert_refused(api, post_job(api, "distill", {**spec, "loss": {"kind": "l2"}}), "spec.loss.kind")
    assert_refused(api, post_job(api, "distill", {**spec, "teachers": []}), "spec.teachers")
    assert_refused(api, post_job(api, "distill", {k: v for k, v in spec.items() if k != "student"}), "spec.student")
    assert_refused(api, post_job(api, "distill", spec, priority=1), "priority", "Extra inputs")
    r = post_job(api, "mystery", spec)
    assert_refused(api, r, "kind")
    assert [e["field"] for e in r.json()["errors"]] == ["kind"]  # the spec is not judged without a kind
    r = api.client.post("/v1/jobs", headers=api.headers, json=[spec])
    assert r.status_code == 422 and r.json()["errors"]
    r = api.client.post(
        "/v1/jobs", headers={**api.headers, "Content-Type": "application/json"}, content=b'{"kind": "distill", "spec": '
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM) and "JSON" in r.json()["detail"]
    assert count(api, Job) == 0 and api.queue_length() == 0


def test_unknown_ids_paths_and_other_projects_ids_are_refused(api):
    spec = setup_distill(api)
    other_headers, _ = api.other_project()
    foreign_model = register_model(api, "foreign", headers=other_headers)["id"]
    foreign_data = upload_dataset(api, headers=other_headers)["id"]
    teacher = spec["teachers"][0]
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "teachers": [teacher, {"model": "mdl_nope"}]}),
        "spec.teachers.1.model",
        "unknown model id",
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "student": {"model": foreign_model}}),
        "spec.student.model",
        "unknown model id",
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "student": {"model": "/models/SmolLM2"}}),
        "spec.student.model",
        "not paths",
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "data": {"train": foreign_data}}),
        "spec.data.train",
        "unknown dataset id",
    )
    assert_refused(
        api,
        post_job(api, "distill", {**spec, "data": {"train": spec["data"]["train"], "valid": "ds_missing"}}),
        "spec.data.valid",
        "unknown dataset id",
    )
    assert_refused(
        api,
        post_job(api, "teacher_cache", {"teacher": teacher["model"], "data": "./train.jsonl"}),
        "spec.data",
        "not paths",
    )
    assert_refused(api, post_job(api, "distill", spec, parent_id="job_missing"), "parent_id", "unknown job id")
    mcq = upload_dataset(api, b'{"question": "q?", "choices": ["a", "b"], "answer": 0}\n')
    assert_refused(
        api, post_job(api, "distill", {**spec, "data": {"train": mcq["id"]}}), "spec.data.train", "format 'mcq'"
    )
    # several problems are reported together
    r = post_job(api, "distill", {**spec, "student": {"model": "mdl_a"}, "teachers": [{"model": "mdl_b"}]})
    assert {e["field"] for e in r.json()["errors"]} == {"spec.student.model", "spec.teachers.0.model"}


def test_student_adapter_must_be_a_live_distill_job_of_the_project(api):
    spec = setup_distill(api)
    _, other_project = api.other_project()
    failed = insert_job(api, status="failed")
    foreign = insert_job(api, project_id=other_project, status="succeeded")
    cache = insert_job(api, status="succeeded", kind="teacher_cache")
    done = insert_job(api, status="succeeded")
    for job_id, words in (
        (failed, "failed distill job"),
        ("job_missing", "unknown job id"),
        (foreign, "unknown job id"),
        (cache, "succeeded teacher_cache job"),
    ):
        r = post_job(api, "distill", {**spec, "student": {**spec["student"], "adapter": job_id}})
        assert_refused(api, r, "spec.student.adapter", words, jobs=4)
    r = post_job(api, "distill", {**spec, "student": {**spec["student"], "adapter": done}}, parent_id=done)
    assert r.status_code == 201 and r.json()["parent_id"] == done
    # a distill job still running: the new job waits for it
    running = insert_job(api, status="running")
    r = post_job(api, "distill", {**spec, "student": {**spec["student"], "adapter": running}})
    assert r.status_code == 201
    with api.db() as session:
        assert running in {d.id for d in lifecycle.dependencies(session, r.json()["id"])}


def test_evaluate_creates_a_benchmark_child_that_waits_for_its_parent(api):
    spec = setup_distill(api)
    valid = upload_dataset(api)["id"]
    spec["evaluate"] = {
        "data": {"text": valid},
        "speed": {"enabled": False},
        "candidates": [{"label": "teacher again", "model": spec["teachers"][0]["model"]}],
    }
    r = post_job(api, "distill", spec)
    assert r.status_code == 201, r.text
    parent = r.json()["id"]
    children = api.client.get("/v1/jobs", params={"parent_id": parent}, headers=api.headers).json()["data"]
    assert [c["kind"] for c in children] == ["benchmark"] and children[0]["status"] == "queued"
    child = children[0]
    assert child["spec"]["reference"] == spec["teachers"][0]["model"]
    assert [c["label"] for c in child["spec"]["candidates"]] == ["student (before)", "distilled", "teacher again"]
    assert child["spec"]["candidates"][0] == {"label": "student (before)", "student_of": parent}
    assert child["spec"]["max_seq_len"] == spec["training"]["max_seq_len"]
    with api.db() as session:
        assert [d.id for d in lifecycle.dependencies(session, child["id"])] == [parent]
    events = api.client.get(f"/v1/jobs/{parent}/events", headers=api.headers).json()["data"]
    assert any(e["kind"] == "evaluation" and e["data"]["job_id"] == child["id"] for e in events)
    # the evaluation's data is checked like a benchmark's
    spec["evaluate"] = {"data": {"mcq": valid}}
    r = post_job(api, "distill", spec)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "spec.evaluate.data.mcq"
    spec["evaluate"] = {"data": {"text": valid}, "candidates": [{"label": "distilled", "model": "x"}]}
    r = post_job(api, "distill", spec)
    assert r.status_code == 422 and "spec.evaluate.candidates" in r.json()["errors"][0]["field"]


def test_idempotency_key(api):
    spec = setup_distill(api)
    h = {**api.headers, "Idempotency-Key": "k-1"}
    body = {"kind": "distill", "spec": spec}
    first = api.client.post("/v1/jobs", headers=h, json=body)
    again = api.client.post("/v1/jobs", headers=h, json=body)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    assert count(api, Job) == 2 and api.queue_length() == 1  # the job and its cache job, sent once
    # the same JSON serialised differently is the same request
    same = api.client.post(
        "/v1/jobs",
        headers={**h, "Content-Type": "application/json"},
        content=b'{"spec": ' + json.dumps(spec, indent=2).encode() + b', "kind": "distill"}',
    )
    assert same.json()["id"] == first.json()["id"]
    other = api.client.post("/v1/jobs", headers=h, json={**body, "spec": {**spec, "teacher_mode": "online"}})
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert count(api, Job) == 2 and count(api, IdempotencyRecord) == 1
    # keys are per project
    other_headers, _ = api.other_project()
    r = api.client.post("/v1/jobs", headers={**other_headers, "Idempotency-Key": "k-1"}, json=body)
    assert r.status_code == 422 and "unknown model id" in r.text


def test_broker_down_still_creates_the_job(database_url, tmp_path, redis_broker):
    broker = f"redis://127.0.0.1:{closed_port()}/0"
    with running_api(database_url, tmp_path, redis_broker, broker_url=broker) as api:
        spec = setup_distill(api)
        started = time.monotonic()
        r = post_job(api, "distill", {**spec, "teacher_mode": "online"})
        assert r.status_code == 201 and r.json()["status"] == "queued"
        assert time.monotonic() - started < 10
        started = time.monotonic()
        r2 = post_job(api, "distill", spec)  # the API stays quiet after a failed send: no second timeout
        assert r2.status_code == 201 and time.monotonic() - started < 1
        with api.db() as session:
            jobs = session.query(Job).all()
            assert len(jobs) == 3 and all(j.enqueued_at is None and j.status == "queued" for j in jobs)


def test_list_filters_and_pages(api):
    queued = [insert_job(api, status="queued") for _ in range(3)]
    failed = insert_job(api, status="failed", kind="teacher_cache")
    c = api.client
    r = c.get("/v1/jobs?status=queued&limit=2", headers=api.headers).json()
    assert [j["id"] for j in r["data"]] == queued[::-1][:2] and r["has_more"]
    r = c.get(f"/v1/jobs?status=queued&limit=2&after={r['data'][-1]['id']}", headers=api.headers).json()
    assert [j["id"] for j in r["data"]] == queued[:1] and not r["has_more"]
    r = c.get("/v1/jobs?kind=teacher_cache", headers=api.headers).json()
    assert [j["id"] for j in r["data"]] == [failed]
    assert len(c.get("/v1/jobs", headers=api.headers).json()["data"]) == 4
    r = c.get("/v1/jobs?status=done", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "status"
    r = c.get("/v1/jobs?kind=train", headers=api.headers)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "kind"


@pytest.mark.parametrize(
    "status, expected", [("queued", "cancelled"), ("running", "cancel_requested"), ("cancelled", "cancelled")]
)
def test_cancel(api, status, expected):
    job_id = insert_job(api, status=status)
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == expected and r.json()["cancel_requested"] is (status != "cancelled")
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()["status"] == expected


def test_cancel_a_finished_job_is_a_conflict(api):
    job_id = insert_job(api, status="succeeded")
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers)
    assert r.status_code == 409 and r.headers["content-type"].startswith(PROBLEM)
    assert api.client.post("/v1/jobs/job_missing/cancel", headers=api.headers).status_code == 404


def test_job_object_shows_progress_error_and_artifacts(api):
    from tests.service.factories import insert_artifact

    job_id = insert_job(api, status="running")
    with api.db() as session:
        job = session.get(Job, job_id)
        job.progress_step, job.eta_seconds, job.summary = 25, 12.5, {"train_loss": 1.5}
    art = insert_artifact(api, job_id, b"abc")
    body = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()
    assert body["progress"] == {"step": 25, "total_steps": 100, "fraction": 0.25, "eta_seconds": 12.5}
    assert body["summary"] == {"train_loss": 1.5}
    assert [a["id"] for a in body["artifacts"]] == [art]
    with api.db() as session:
        from service.core import lifecycle

        lifecycle.finish(session, job_id, None, "failed", error_code="user_error", error_message="bad data")
    body = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers).json()
    assert body["status"] == "failed" and body["error"] == {"code": "user_error", "message": "bad data"}
    assert body["finished_at"].endswith("Z")


def test_a_hand_submitted_teacher_cache_is_reused_by_distill_jobs(api):
    spec = setup_distill(api)
    r = post_job(
        api,
        "teacher_cache",
        {
            "teacher": spec["teachers"][0]["model"],
            "data": spec["data"]["train"],
            "top_k": spec["loss"]["top_k"],
            "max_seq_len": spec["training"]["max_seq_len"],
        },
    )
    assert r.status_code == 201, r.text
    r2 = post_job(api, "distill", spec)
    with api.db() as session:
        assert r.json()["id"] in {d.id for d in lifecycle.dependencies(session, r2.json()["id"])}


def test_a_job_body_must_be_declared_json(api):
    body = json.dumps({"kind": "distill", "spec": setup_distill(api)})
    auth = {"Authorization": api.headers["Authorization"]}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml", None):
        headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
        r = api.client.post("/v1/jobs", headers=headers, content=body)
        assert r.status_code == 415, (content_type, r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["errors"][0]["field"] == "Content-Type"
        assert (content_type or "none") in r.json()["detail"]
    assert count(api, Job) == 0
    r = api.client.post("/v1/jobs", headers={**auth, "Content-Type": "application/json; charset=utf-8"}, content=body)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"training": {"seed": 10**30}}, "spec.training.seed"),
        ({"training": {"seed": -1}}, "spec.training.seed"),
        ({"adapter": {"scale": 1e308}}, "spec.adapter.scale"),
        ({"training": {"param_groups": [{"pattern": "x", "lr_mult": 1e308}]}}, "spec.training.param_groups.0.lr_mult"),
        ({"training": {"warmup_steps": 10**15}}, "spec.training.warmup_steps"),
        ({"training": {"eval_every": 10**15}}, "spec.training.eval_every"),
        ({"training": {"checkpoint_every": 10**15}}, "spec.training.checkpoint_every"),
        ({"training": {"keep_checkpoints": 10**15}}, "spec.training.keep_checkpoints"),
        ({"training": {"eval_batches": 10**15}}, "spec.training.eval_batches"),
        ({"training": {"steps": None, "stages": [{"steps": 6_000_000}, {"steps": 6_000_000}]}}, "spec.training"),
        ({"training": {"steps": None, "stages": [{"steps": 2**31}]}}, "spec.training.stages.0.steps"),
    ],
)
def test_numbers_a_run_cannot_use_are_refused(api, patch, field):
    spec = setup_distill(api)
    for section, values in patch.items():
        spec[section] = {**spec.get(section, {}), **values}
    if spec["training"].get("steps", 0) is None:
        del spec["training"]["steps"]
    assert_refused(api, post_job(api, "distill", spec), field)


@pytest.mark.parametrize(
    "path, field",
    [
        ("/v1/jobs/job_1%002", "job_id"),
        ("/v1/jobs/job_1%0D%0Ax/events", "job_id"),
        ("/v1/datasets/ds%00", "dataset_id"),
        ("/v1/models/m%00", "model_id"),
        ("/v1/artifacts/a%00", "artifact_id"),
        ("/v1/jobs?after=job_%00", "after"),
        ("/v1/jobs?parent_id=%00", "parent_id"),
        ("/v1/datasets?after=%00", "after"),
    ],
)
def test_ids_with_control_characters_are_refused(api, path, field):
    r = api.client.get(path, headers=api.headers)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM) and [e["field"] for e in r.json()["errors"]] == [field]


def test_an_id_with_a_nul_inside_a_spec_is_refused(api):
    spec = setup_distill(api)
    spec["teachers"][0]["model"] = "mdl_\x00x"
    assert_refused(api, post_job(api, "distill", spec), "spec.teachers.0.model", "is not an id")


def test_a_body_nested_too_deeply_is_a_400(api):
    body = '{"kind": "distill", "spec": ' + '{"a": ' * 1000 + "1" + "}" * 1000 + "}"
    r = api.client.post("/v1/jobs", headers={**api.headers, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith(PROBLEM) and r.json()["errors"][0]["field"] == "body"
    assert count(api, Job) == 0
