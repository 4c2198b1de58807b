"""A full disk, for real: the artifact root on a small tmpfs of its own, a real worker process.

A run that cannot fit is refused before it starts (`resource`, naming the folder and the space); a run that
fills the disk anyway fails as `resource`, not `internal_error`, and leaves none of its partial files, so the
next job runs once there is space again (before, every later job failed at once until files were deleted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.small_disk import small_filesystem
from tests.worker.conftest import BROKER_URL, Service, sqlite_url
from tests.worker.test_worker_process import distill_spec, wait_done

pytestmark = pytest.mark.usefixtures("redis_db14")


@pytest.fixture
def small_disk(tmp_path):
    with small_filesystem(tmp_path / "disk", megabytes=24) as mount:
        yield mount


def _service(tmp_path: Path, disk: Path, name: str, **env: str) -> Service:
    folder = tmp_path / name
    folder.mkdir()
    svc = Service(folder, sqlite_url(folder), BROKER_URL)  # database and logs off the small disk
    svc.artifact_root = disk / "artifacts"
    svc.env.update(
        {"DISTILLERY_ARTIFACT_ROOT": str(svc.artifact_root), "DISTILLERY_CACHE_DIR": str(disk / "cache"), **env}
    )
    return svc


def _refs(svc: Service, tiny_teacher, tiny_student, tiny_text) -> tuple[str, str, str, str]:
    return (
        svc.add_model(tiny_student, "s"),
        svc.add_model(tiny_teacher, "t"),
        svc.add_dataset(tiny_text["train"], "train"),
        svc.add_dataset(tiny_text["valid"], "valid"),
    )


def _leftovers(svc: Service, job_id: str) -> list[str]:
    root = svc.artifact_root / "jobs"
    return [str(p) for p in root.rglob("*") if job_id in str(p) and p.is_file()] if root.exists() else []


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, small_disk, tiny_teacher, tiny_student, tiny_text):
    svc = _service(tmp_path, small_disk, "a")
    student, teacher, train, valid = _refs(svc, tiny_teacher, tiny_student, tiny_text)
    svc.start_worker()
    try:
        spec = distill_spec(student, teacher, train, valid, steps=4)
        spec["teacher_mode"] = "online"
        done = wait_done(svc, svc.submit("distill", spec))
    finally:
        svc.stop_workers()
    assert done.status == "failed" and done.error_code == "resource", (done.error_code, done.error_message)
    assert "not enough disk space in" in done.error_message and str(small_disk) in done.error_message
    assert "free" in done.error_message


def test_a_run_that_fills_the_disk_fails_as_resource_and_leaves_nothing(
    tmp_path, small_disk, tiny_teacher, tiny_student, tiny_text
):
    # the pre-flight check is skipped so the run really writes until the disk is full
    svc = _service(tmp_path, small_disk, "b", DISTILLERY_SKIP_DISK_CHECK="1")
    student, teacher, train, valid = _refs(svc, tiny_teacher, tiny_student, tiny_text)
    ballast = small_disk / "ballast"
    free_after = 600 << 10  # a few checkpoints of the tiny student, not hundreds
    with open(ballast, "wb") as f:
        import shutil

        f.write(b"\0" * (shutil.disk_usage(small_disk).free - free_after))
    svc.start_worker()
    try:
        spec = distill_spec(
            student, teacher, train, valid, steps=400, checkpoint_every=1, keep_checkpoints=1000, eval_every=1000
        )
        spec["teacher_mode"] = "online"
        job_id = svc.submit("distill", spec)
        done = wait_done(svc, job_id, timeout=180)
        assert done.status == "failed" and done.error_code == "resource", (
            done.error_code,
            done.error_message,
            svc.logs(),
        )
        assert "disk is full" in done.error_message and "partial files were removed" in done.error_message
        assert _leftovers(svc, job_id) == []

        # space again: the next job runs (nothing of the failed one is in its way)
        ballast.unlink()
        again = wait_done(
            svc, svc.submit("distill", {**spec, "training": {**spec["training"], "steps": 4, "checkpoint_every": 2}})
        )
        assert again.status == "succeeded", (again.error_code, again.error_message, svc.logs())
    finally:
        svc.stop_workers()
