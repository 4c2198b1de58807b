"""Attempt folders: a later attempt starts from the newest earlier one, and what a stale attempt writes
afterwards never reaches it."""

from __future__ import annotations

from worker import attempts


def test_an_attempt_inherits_checkpoints_and_small_files_and_is_immune_to_the_one_before(tmp_path):
    job = tmp_path / "job"
    first = attempts.prepare(job, 1)
    (first / "checkpoints" / "step-0000010").mkdir(parents=True)
    (first / "checkpoints" / "step-0000010" / "state.json").write_text('{"step": 10}')
    (first / "checkpoints" / ".tmp-step-0000020").mkdir()
    (first / "checkpoints" / ".tmp-step-0000020" / "state.json").write_text('{"step": 20}')
    (first / "metrics.jsonl").write_text('{"step": 10}\n')
    (first / "student").mkdir()
    (first / "student" / "model.safetensors").write_bytes(b"big")

    second = attempts.prepare(job, 2)
    assert (second / "checkpoints" / "step-0000010" / "state.json").read_text() == '{"step": 10}'
    assert not (second / "checkpoints" / ".tmp-step-0000020").exists()  # never finished: not inherited
    assert not (second / "student").exists()  # rebuilt by every attempt
    # the stale first attempt wakes up and writes on
    with open(first / "metrics.jsonl", "a") as f:
        f.write('{"step": 11}\n')
    (first / "checkpoints" / "step-0000010" / "state.json").unlink()  # its pruning
    assert (second / "metrics.jsonl").read_text() == '{"step": 10}\n'
    assert (second / "checkpoints" / "step-0000010" / "state.json").is_file()
    # a third attempt starts from the second, not from the stale first
    (second / "metrics.jsonl").write_text('{"step": 10}\n{"step": 12}\n')
    third = attempts.prepare(job, 3)
    assert (third / "metrics.jsonl").read_text().endswith('{"step": 12}\n')

    (third / "adapters.safetensors").write_bytes(b"A")
    attempts.publish(third, job)
    assert (job / "adapters.safetensors").read_bytes() == b"A" and (job / "checkpoints" / "step-0000010").is_dir()
    summary = {"student": str(third / "student"), "n": 1, "list": [str(third)]}
    assert attempts.moved_paths(summary, third, job) == {"student": str(job / "student"), "n": 1, "list": [str(job)]}
    attempts.discard(job)
    assert not (job / ".attempts").exists() and (job / "adapters.safetensors").is_file()


def test_a_run_started_before_attempt_folders_resumes_from_the_job_folder(tmp_path):
    job = tmp_path / "job"
    (job / "checkpoints" / "step-0000005").mkdir(parents=True)
    (job / "checkpoints" / "step-0000005" / "state.json").write_text('{"step": 5}')
    (job / "metrics.jsonl").write_text('{"step": 5}\n')
    work = attempts.prepare(job, 2)
    assert (work / "checkpoints" / "step-0000005" / "state.json").is_file()
    assert (work / "metrics.jsonl").read_text() == '{"step": 5}\n'


def test_a_failed_attempt_removes_its_own_folder_and_earlier_ones_never_a_later_one(tmp_path):
    job = tmp_path / "job"
    for n in (1, 2, 3):
        (attempts.prepare(job, n) / "metrics.jsonl").write_text(f"{n}\n")
    attempts.discard(job, up_to=2)  # attempt 2 failed; attempt 3 belongs to whoever holds the job now
    assert sorted(p.name for p in (job / ".attempts").iterdir()) == ["3"]
