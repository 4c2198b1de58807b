"""The SDK's resources, sync and async, against a real API process over a socket: datasets, models (folder
and GGUF upload), jobs (from dicts, typed specs and YAML files), events, metrics, checkpoints, artifacts;
cursor pagination; typed errors; configuration from arguments, environment and config file."""

from __future__ import annotations

import asyncio
import warnings

import httpx
import pytest
import yaml

from distillery import (
    AsyncDistillery,
    AuthenticationError,
    BadRequestError,
    ConfigError,
    Distillery,
    DistillSpec,
    Job,
    NotFoundError,
    SpecError,
)
from service.core.db.models import Checkpoint, StepMetric


@pytest.fixture(scope="module")
def registered(server, tiny_text, tiny_teacher, tiny_student):
    with server.client() as c:
        ds = c.datasets.upload(tiny_text["train"], name="train")
        teacher = c.models.add(tiny_teacher, name="teacher")
        student = c.models.add(tiny_student)
    return {"dataset": ds, "teacher": teacher, "student": student}


def job_dict(r) -> dict:
    return {
        "kind": "distill",
        "spec": {
            "student": {"model": r["student"].id},
            "teachers": [{"model": r["teacher"].id}],
            "teacher_mode": "online",
            "data": {"train": r["dataset"].id, "valid": 0.25},
            "training": {"steps": 2},
        },
    }


def test_datasets_and_models(client, registered, tiny_text):
    ds = registered["dataset"]
    assert ds.format == "text" and ds.records == 48 and len(ds.sha256) == 64
    assert client.datasets.get(ds.id) == ds
    other = client.datasets.upload(tiny_text["valid"], name="valid", format="text")
    assert [d.id for d in client.datasets.list(limit=1)][:2] == [other.id, ds.id]  # newest first, across pages
    client.datasets.delete(other.id)
    with pytest.raises(NotFoundError):
        client.datasets.get(other.id)
    teacher = registered["teacher"]
    assert client.models.get(teacher.id).name == "teacher" and teacher.info
    assert {teacher.id, registered["student"].id} <= {m.id for m in client.models.list(limit=1)}


def test_gguf_upload(client, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = client.models.upload(path, name="uploaded")
    assert model.name == "uploaded" and model.format == "gguf" and model.source == "upload"
    assert client.models.get(model.id).fingerprint == model.fingerprint
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"NOPE" * 10)
    with pytest.raises(BadRequestError) as e:
        client.models.upload(not_gguf)
    assert e.value.errors[0]["field"] == "file"


def test_jobs_from_dict_typed_spec_and_yaml(client, registered, tmp_path):
    job = client.jobs.create(job_dict(registered))
    assert isinstance(job, Job) and job.status == "queued" and job.kind == "distill"
    typed = DistillSpec.model_validate(job_dict(registered)["spec"])
    job2 = client.jobs.create(typed, parent_id=job.id)
    assert job2.parent_id == job.id and job2.spec["training"]["steps"] == 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(registered)))
    job3 = client.jobs.create(path)
    job4 = client.jobs.create(str(path))
    ids = {job.id, job2.id, job3.id, job4.id}
    assert len(ids) == 4
    listed = [j.id for j in client.jobs.list(limit=1)]  # one per page: follows the cursor
    assert ids <= set(listed) and len(listed) == len(set(listed))
    assert ids <= {j.id for j in client.jobs.list(status="queued", kind="distill")}
    assert not ids & {j.id for j in client.jobs.list(kind="benchmark")}

    events = client.jobs.events(job.id)
    assert events and events[0].kind == "created"
    assert client.jobs.events(job.id, after=events[-1].id) == []
    assert client.jobs.cancel(job3.id).status in ("cancelled", "cancel_requested")
    assert client.jobs.get(job3.id).status == "cancelled"


def test_metrics_checkpoints_artifacts(client, server):
    job_id = server.insert_job()
    with server.db() as session:
        for step in (10, 20):
            session.add(StepMetric(job_id=job_id, step=step, kind="train", name="loss", value=1.0 / step))
            session.add(StepMetric(job_id=job_id, step=step, kind="eval", name="val_kl", value=2.0 / step))
        session.add(Checkpoint(job_id=job_id, step=20, path="checkpoints/step-20"))
    art = server.insert_artifact(job_id, "adapters.safetensors", b"weights")
    assert [(m.step, m.value) for m in client.jobs.metrics(job_id, name="loss")] == [(10, 0.1), (20, 0.05)]
    assert {m.name for m in client.jobs.metrics(job_id)} == {"loss", "val_kl"}
    assert [c.step for c in client.jobs.checkpoints(job_id)] == [20]
    arts = client.artifacts.list(job_id)
    assert [a.id for a in arts] == [art] and arts[0].size_bytes == 7
    assert client.artifacts.get(art) == arts[0] == client.jobs.artifacts(job_id)[0]


def test_typed_errors(client, server, registered):
    with pytest.raises(NotFoundError) as e:
        client.jobs.get("job_doesnotexist")
    assert e.value.status == 404 and e.value.problem["status"] == 404 and e.value.detail
    with pytest.raises(NotFoundError):
        client.jobs.get("../datasets")  # an id never leaves its path segment
    body = job_dict(registered)
    body["spec"]["student"]["model"] = "mdl_nope"  # valid shape, unknown model: the server says which field
    with pytest.raises(BadRequestError) as e:
        client.jobs.create(body)
    assert e.value.status == 422 and [x["field"] for x in e.value.errors] == ["spec.student.model"]
    assert "spec.student.model" in e.value.one_line()
    with Distillery(server.url, "dst_wrong") as bad, pytest.raises(AuthenticationError) as e:
        bad.datasets.list().__next__()
    assert e.value.status == 401


def test_spec_errors_before_sending(client, registered, tmp_path):
    """An invalid spec is refused locally, naming the field and, for a file, its line; nothing is sent."""
    sent = []
    inner = httpx.HTTPTransport()

    class Spy(httpx.BaseTransport):
        def handle_request(self, request):
            sent.append(request.url.path)
            return inner.handle_request(request)

    path = tmp_path / "bad.yaml"
    body = job_dict(registered)
    body["spec"]["training"]["learning_rat"] = 0.1
    body["spec"]["training"]["steps"] = 0
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    with Distillery(
        client.base_url, client.api_key, http_client=httpx.Client(base_url=client.base_url, transport=Spy())
    ) as spied:
        with pytest.raises(SpecError) as e:
            spied.jobs.create(path)
    assert sent == []
    fields = {x["field"]: x.get("line") for x in e.value.errors}
    lines = path.read_text().splitlines()
    assert "steps: 0" in lines[fields["spec.training.steps"] - 1]
    assert "learning_rat" in lines[fields["spec.training.learning_rat"] - 1]
    assert str(path) in str(e.value)
    with pytest.raises(SpecError, match="kind"):
        client.jobs.create({"kind": "train", "spec": {}})


def test_async_client(server, registered, tiny_text):
    async def main():
        async with AsyncDistillery(server.url, server.key) as c:
            ds = await c.datasets.upload(tiny_text["valid"], name="async")
            assert (await c.datasets.get(ds.id)).records == 8
            assert ds.id in [d.id async for d in c.datasets.list(limit=1)]
            assert registered["teacher"].id in [m.id async for m in c.models.list(limit=1)]
            job = await c.jobs.create(job_dict(registered))
            assert (await c.jobs.get(job.id)).status == "queued"
            assert job.id in [j.id async for j in c.jobs.list(limit=2, kind="distill")]
            assert [e.kind for e in await c.jobs.events(job.id)] == ["created"]
            assert await c.jobs.metrics(job.id) == [] and await c.jobs.checkpoints(job.id) == []
            assert await c.artifacts.list(job.id) == []
            assert (await c.jobs.cancel(job.id)).status == "cancelled"
            with pytest.raises(NotFoundError):
                await c.jobs.get("job_nope")
            await c.datasets.delete(ds.id)

    asyncio.run(main())


def test_configuration_sources(server, monkeypatch, tmp_path):
    for name in ("DISTILLERY_BASE_URL", "DISTILLERY_API_KEY", "DISTILLERY_PROFILE", "DISTILLERY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert Distillery().base_url == "http://127.0.0.1:8000"  # nothing set: the local default

    config = tmp_path / "distillery" / "config.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "base_url": "http://wrong:1",
                "api_key": "dst_wrong",
                "timeout": 5,
                "profiles": {"here": {"base_url": server.url, "api_key": server.key}},
            }
        )
    )
    config.chmod(0o600)
    with Distillery(profile="here") as c:  # a profile of the file
        assert c.base_url == server.url and isinstance(list(c.models.list()), list)
    c = Distillery()
    assert (c.base_url, c.api_key, c.timeout.read) == ("http://wrong:1", "dst_wrong", 5)
    monkeypatch.setenv("DISTILLERY_BASE_URL", server.url)  # environment beats the file
    monkeypatch.setenv("DISTILLERY_API_KEY", server.key)
    with Distillery() as c:
        assert c.base_url == server.url and isinstance(list(c.models.list()), list)
    assert Distillery(api_key="dst_arg").api_key == "dst_arg"  # arguments beat everything
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        Distillery(profile="nope")
    config.write_text("base_url: [unclosed\n")
    with pytest.raises(ConfigError, match=str(config)):
        Distillery(profile="here")
    config.write_text(yaml.safe_dump({"api_key": "dst_x", "colour": "blue"}))
    monkeypatch.delenv("DISTILLERY_API_KEY")
    with pytest.raises(ConfigError, match="colour"):
        Distillery()
    config.write_text(yaml.safe_dump({"api_key": "dst_x"}))
    config.chmod(0o644)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Distillery()
    assert any("chmod 600" in str(w.message) for w in seen)
