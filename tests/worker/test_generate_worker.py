"""The playground's `generate` job on a real `distillery-server worker` (Redis db 14, SQLite), on the tiny models:
the teacher, the student before training and the distilled student of a distill job answer one prompt; the job
waits for the distill job, its greedy answers are mlx-lm's own `generate`, a rerun writes the same text, and an
adapter that does not fit its model is the user's error naming the field."""

from __future__ import annotations

from service.core.storage import job_output_dir
from tests.worker.test_worker_process import distill_spec, events, job, wait_done

PROMPT = "The built-in function"


def test_generate_answers_side_by_side_after_the_distill_job(service, tiny_teacher, tiny_student, tiny_text):
    from mlx_lm import generate, load

    teacher = service.add_model(tiny_teacher, "teacher")
    student = service.add_model(tiny_student, "student")
    train = service.add_dataset(tiny_text["train"], "train")
    valid = service.add_dataset(tiny_text["valid"], "valid")
    distill_id = service.submit("distill", distill_spec(student, teacher, train, valid, steps=4))
    spec = {
        "prompt": PROMPT,
        "models": [
            {"label": "teacher", "model": teacher},
            {"label": "student (before)", "student_of": distill_id},
            {"label": "distilled", "adapter": distill_id},
        ],
        "max_tokens": 16,
    }
    gen_id = service.submit("generate", spec)  # waits for the distill job, then is sent
    done = wait_done(service, gen_id, timeout=180)
    distilled = job(service, distill_id)
    assert distilled.status == "succeeded", distilled.error_message
    assert done.status == "succeeded", (done.error_code, done.error_message, service.logs())
    answers = {a["label"]: a for a in done.summary["answers"]}
    assert list(answers) == ["teacher", "student (before)", "distilled"]
    adapter_dir = job_output_dir(service.artifact_root, distilled)
    for label, (path, adapter) in {
        "teacher": (tiny_teacher, None),
        "student (before)": (tiny_student, None),
        "distilled": (tiny_student, adapter_dir),
    }.items():
        model, tokenizer = load(str(path), adapter_path=str(adapter) if adapter else None)
        assert answers[label]["text"] == generate(model, tokenizer, prompt=PROMPT, max_tokens=16), label
        a = answers[label]
        assert 0 < a["tokens"] <= 16 and a["seconds"] > 0 and a["tokens_per_second"] > 0
    assert answers["distilled"]["adapter"] == distill_id and answers["student (before)"]["student_of"] == distill_id
    # one progress step per model, an event per answer
    assert (done.progress_step, done.total_steps) == (3, 3)
    assert [e.data["label"] for e in events(service, gen_id) if e.kind == "answer"] == list(answers)

    # sampled, with a seed: a rerun writes the same text
    sampled = {**spec, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    first, again = (wait_done(service, service.submit("generate", sampled), timeout=120) for _ in range(2))
    assert first.status == again.status == "succeeded"
    assert [a["text"] for a in first.summary["answers"]] == [a["text"] for a in again.summary["answers"]]

    # the student's adapter on the teacher (another width): the user's to fix, naming the field
    misfit = {
        "prompt": PROMPT,
        "models": [{"label": "t", "model": teacher}, {"label": "x", "model": teacher, "adapter": distill_id}],
    }
    bad = wait_done(service, service.submit("generate", misfit), timeout=120)
    assert (bad.status, bad.error_code) == ("failed", "user_error"), bad.error_message
    assert bad.error_message.startswith("models.1.adapter: ")
