"""`distillery generate`: a generate job from flags (`--job` fills in a distill job's teacher, student before and
distilled student), followed to its end and printed side by side; bad input is refused naming the field. The
API process is real; the job is finished by the test, as a worker would (tests/clients/conftest.py)."""

from __future__ import annotations

import json
import threading
import time

from sqlalchemy import select

from service.core.db.models import Job
from tests.clients.test_cli import ids  # noqa: F401 (a fixture)


def answer_next_generate_job(server) -> threading.Thread:
    """Act as a worker: the next generate job gets one answer per model of its spec."""

    def work():
        for _ in range(500):
            with server.db() as session:
                job = session.scalars(select(Job).where(Job.kind == "generate", Job.status == "queued")).first()
                if job is not None:
                    spec = job.spec
                    job_id = job.id
                    break
            time.sleep(0.02)
        answers = [
            {
                "label": m["label"],
                "text": f"answer of {m['label']}",
                "tokens": 3,
                "seconds": 0.5,
                "tokens_per_second": 6.0,
            }
            for m in spec["models"]
        ]
        with server.db() as session:
            from service.core import lifecycle

            lifecycle.finish(session, job_id, None, "succeeded", summary={"answers": answers})

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_generate_prints_the_answers_side_by_side(cli, ids, server):  # noqa: F811
    distill = server.insert_job(status="succeeded")
    with server.db() as session:
        session.get(Job, distill).spec = {"student": {"model": ids["student"]}, "teachers": [{"model": ids["teacher"]}]}

    thread = answer_next_generate_job(server)
    code, out, err = cli("generate", "--prompt", "Once upon", "--job", distill, "--model", f"plain={ids['student']}")
    thread.join()
    assert code == 0, err
    for label in ("teacher", "student (before)", "distilled", "plain"):
        assert label in out and f"answer of {label}" in out
    with server.db() as session:
        job = session.scalars(select(Job).where(Job.kind == "generate").order_by(Job.id.desc())).first()
        assert job.spec["models"] == [
            {"label": "teacher", "model": ids["teacher"], "adapter": None, "student_of": None},
            {"label": "student (before)", "model": None, "adapter": None, "student_of": distill},
            {"label": "distilled", "model": None, "adapter": distill, "student_of": None},
            {"label": "plain", "model": ids["student"], "adapter": None, "student_of": None},
        ]
        assert job.spec["prompt"] == "Once upon" and job.spec["max_tokens"] == 128 and job.spec["temperature"] == 0

    # two models fit side by side in 80 columns: a table
    thread = answer_next_generate_job(server)
    code, out, _ = cli("generate", "--prompt", "Hi", "--model", f"a={ids['student']}", "--model", f"b={ids['teacher']}")
    thread.join()
    assert code == 0 and "┃ a" in out and "answer of a" in out and "answer of b" in out

    thread = answer_next_generate_job(server)
    code, out, _ = cli("generate", "--prompt", "Hi", "--chat", "--adapter", distill, "--max-tokens", "8", "--json")
    thread.join()
    assert code == 0
    job = json.loads(out)
    assert job["spec"]["prompt"] == [{"role": "user", "content": "Hi"}] and job["spec"]["max_tokens"] == 8
    assert [a["label"] for a in job["summary"]["answers"]] == [f"adapter of {distill}"]
    code, out, _ = cli("status", job["id"])
    assert code == 0 and f"adapter of {distill}" in out and "answer of adapter of" in out


def test_generate_refusals_name_the_field_or_flag(cli, ids):  # noqa: F811
    code, _, err = cli("generate", "--prompt", "   ", "--model", ids["student"])
    assert code == 1 and "spec.prompt" in err
    code, _, err = cli("generate", "--prompt", "Hi", "--model", ids["student"], "--max-tokens", "0")
    assert code == 1 and "spec.max_tokens" in err
    code, _, err = cli("generate", "--prompt", "Hi", "--model", "mdl_nope")
    assert code == 1 and "spec.models.0.model" in err
    code, _, err = cli("generate", "--prompt", "Hi")
    assert code == 1 and "--model" in err
