"""The compare job kind through the API: its arms become child distill jobs it waits for."""

from __future__ import annotations

from sqlalchemy import select

from service.core import lifecycle
from service.core.db.models import Job, JobEvent
from tests.service.factories import register_model, setup_distill, upload_dataset
from tests.service.test_jobs import assert_refused, post_job


def two_teacher_base(api) -> dict:
    spec = setup_distill(api)
    second = register_model(api, "teacher2")
    spec["teachers"] = [spec["teachers"][0], {"model": second["id"], "weight": 3.0}]
    return spec


def test_compare_makes_an_arm_per_variant_and_waits_for_them(api):
    base = two_teacher_base(api)
    r = post_job(api, "compare", {"base": base})
    assert r.status_code == 201, r.text
    compare_id = r.json()["id"]
    with api.db() as session:
        arms = session.scalars(select(Job).where(Job.parent_id == compare_id).order_by(Job.id)).all()
        made = session.scalars(select(JobEvent).where(JobEvent.job_id == compare_id, JobEvent.kind == "arms")).one()
        names = [a["name"] for a in made.data["arms"]]
        by_id = {a.id: a for a in arms}
        specs = {a["name"]: by_id[a["job_id"]].spec for a in made.data["arms"]}
        assert names == ["teacher 0", "teacher 1", "equal", "confidence", "learned"]
        assert all(a.kind == "distill" for a in arms) and len(arms) == 5
        assert [t["model"] for t in specs["teacher 1"]["teachers"]] == [base["teachers"][1]["model"]]
        assert [t["weight"] for t in specs["equal"]["teachers"]] == [1.0, 1.0]
        assert specs["learned"]["teacher_weighting"] == "learned"
        assert [t["weight"] for t in specs["learned"]["teachers"]] == [1.0, 3.0]  # the base's weights: the prior
        compare = session.get(Job, compare_id)
        assert lifecycle.readiness(session, compare) == "waiting"  # until every arm has finished
        assert {d.id for d in lifecycle.dependencies(session, compare_id)} == set(by_id)
    only = post_job(api, "compare", {"base": base, "arms": ["confidence", "equal"]})
    assert only.status_code == 201, only.text
    # cancelling the comparison cancels its arms (queued here: at once)
    r = api.client.post(f"/v1/jobs/{compare_id}/cancel", headers=api.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    with api.db() as session:
        assert {a.status for a in session.scalars(select(Job).where(Job.parent_id == compare_id))} == {"cancelled"}


def test_compare_refusals_name_the_field(api):
    base = two_teacher_base(api)
    one = {**base, "teachers": base["teachers"][:1]}
    assert_refused(api, post_job(api, "compare", {"base": one}), "spec", "needs two or more teachers")
    unknown = {**base, "teachers": [base["teachers"][0], {"model": "mdl_" + "0" * 24}]}
    assert_refused(api, post_job(api, "compare", {"base": unknown}), "spec.base.teachers.1.model", "unknown model")
    pairs = upload_dataset(api, b'{"prompt": "Hi.", "chosen": " Hello!", "rejected": " Go away."}\n' * 3)
    wrong = {**base, "data": {**base["data"], "train": pairs["id"]}}
    assert_refused(api, post_job(api, "compare", {"base": wrong}), "spec.base.data.train", "needs")
    bad_domain = {"base": base, "domains": {"plays": pairs["id"]}}
    assert_refused(api, post_job(api, "compare", bad_domain), "spec.domains.plays", "needs")
    twice = {"base": base, "arms": ["equal", "equal"]}
    assert_refused(api, post_job(api, "compare", twice), "spec", "each arm once")
    r = post_job(api, "compare", {"base": base, "domains": {"plays": base["data"]["train"]}})
    assert r.status_code == 201, r.text
