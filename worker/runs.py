"""One claimed job run through the engine, by kind. Imports MLX: only ever imported inside a running task.

Each runner returns the job's summary and, for kinds that write files, the output folder whose files become
the job's artifacts. Engine errors pass through: `UserError` and `Cancelled` are handled by the task.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError

from distillery_contract.specs import (
    BenchmarkCandidate,
    BenchmarkSpec,
    CompareSpec,
    DistillSpec,
    GenerateSpec,
    TeacherCacheSpec,
)
from service.core.db.models import TeacherCacheRecord
from service.core.db.session import session_scope
from service.core.settings import Settings
from service.core.storage import folder_bytes, job_output_dir
from worker import attempts
from worker.engine import cancel, cpu_memory
from worker.engine.benchmark import BenchmarkInputs, CandidateInput, run_benchmark
from worker.engine.cache import CacheStore
from worker.engine.distill import Inputs, build_teacher_cache, run_distill
from worker.engine.errors import UserError
from worker.engine.generate import GenerateInput, run_generate
from worker.engine.local import format_validation_error
from worker.engine.train import Hooks
from worker.recorder import JobRecorder, jsonable, sync_to_checkpoint
from worker.resolve import Resolver

log = logging.getLogger(__name__)

SpecModel = TypeVar("SpecModel", bound=BaseModel)


@dataclass
class JobInfo:
    """What a run needs of the job row, read once at claim time."""

    id: str
    project_id: str
    kind: str
    spec: dict
    attempts: int
    owner: str | None = None  # the lease owner of this attempt: every write of the run is fenced by it


def work_dir(settings: Settings, job: JobInfo) -> Path:
    """The folder this attempt writes in (see worker.attempts); published to the job's folder on success."""
    return attempts.attempt_dir(job_output_dir(settings.artifact_root, job), job.attempts)


@dataclass
class Result:
    summary: dict
    out_dir: Path | None = None


def run(
    job: JobInfo,
    settings: Settings,
    recorder: JobRecorder,
    should_stop: Callable[[], bool],
    stop_now: Callable[[], bool] | None = None,
) -> Result:
    """`should_stop` is asked between steps, `stop_now` at the engine's cancel points within a phase."""
    hooks = Hooks(
        on_metrics=recorder.metrics, on_event=recorder.event, on_checkpoint=recorder.checkpoint, should_stop=should_stop
    )
    with cancel.stop_now_when(stop_now or (lambda: False)):
        if job.kind in ("teacher_cache", "distill"):
            with cpu_memory.reusing_buffers():  # a step's large buffers reused by the next (cpu_memory.py)
                run_kind = teacher_cache if job.kind == "teacher_cache" else distill
                return run_kind(job, settings, recorder, hooks)
        if job.kind == "benchmark":
            return benchmark(job, settings, recorder, hooks)
        if job.kind == "generate":
            return generate(job, settings, recorder, hooks)
        if job.kind == "compare":
            return compare(job, settings, recorder)
    raise UserError(f"unknown job kind {job.kind!r}")


def _validate(model: type[SpecModel], spec: dict) -> SpecModel:
    try:
        return model.model_validate(spec)
    except ValidationError as e:
        raise UserError("invalid spec: " + format_validation_error(e)) from None


def teacher_caches(settings: Settings, project_id: str) -> CacheStore:
    """The project's own teacher caches. Not shared between projects: a cache hit (an event, and a run that is
    much faster) would tell one project that another distilled the same data with the same teacher."""
    return CacheStore(Path(settings.cache_dir).expanduser() / "teacher-caches" / project_id)


def teacher_cache(job: JobInfo, settings: Settings, recorder: JobRecorder, hooks: Hooks) -> Result:
    spec = _validate(TeacherCacheSpec, job.spec)
    r = Resolver(settings, job.project_id)
    teacher, data = r.model(spec.teacher, "teacher"), r.dataset(spec.data, "data")

    def on_event(kind: str, message: str, data: dict) -> None:
        # the build reports its tokens done as `cache_progress` events: they are this job's progress too
        if kind == "cache_progress" and data.get("total"):
            recorder.progress({"step": data["done"], "total_steps": data["total"]})
        recorder.event(kind, message, data)

    hooks = dataclasses.replace(hooks, on_event=on_event)
    cache = build_teacher_cache(spec, teacher, data, teacher_caches(settings, job.project_id), hooks)
    meta = jsonable(cache.meta)
    size = folder_bytes(cache.path)
    try:
        with session_scope() as session:
            if session.get(TeacherCacheRecord, meta["key"]) is None:
                session.add(
                    TeacherCacheRecord(
                        key=meta["key"],
                        job_id=job.id,
                        path=str(cache.path.resolve()),
                        tokens=int(meta["tokens"]),
                        size_bytes=size,
                        meta=meta,
                    )
                )
    except IntegrityError:  # another worker recorded the same cache at the same moment
        pass
    keys = (
        "key",
        "tokens",
        "examples",
        "top_k",
        "vocab_size",
        "bytes_per_token",
        "reconstruction_kl",
        "build_seconds",
        "build_tokens_per_second",
    )
    return Result(summary={**{k: meta.get(k) for k in keys}, "size_bytes": size})


def distill(job: JobInfo, settings: Settings, recorder: JobRecorder, hooks: Hooks) -> Result:
    spec = _validate(DistillSpec, job.spec)
    r = Resolver(settings, job.project_id)
    valid = spec.data.valid
    inputs = Inputs(
        student=r.model(spec.student.model, "student.model"),
        teachers=[r.model(t.model, f"teachers.{i}.model") for i, t in enumerate(spec.teachers)],
        train=r.dataset(spec.data.train, "data.train"),
        valid=valid if isinstance(valid, float) else r.dataset(valid, "data.valid"),
        student_adapter=r.adapter(spec.student.adapter, "student.adapter") if spec.student.adapter else None,
        preference=r.dataset(spec.data.preference, "data.preference") if spec.data.preference else None,
    )
    # a re-run resumes from the checkpoints of the attempt before it
    out_dir = attempts.prepare(job_output_dir(settings.artifact_root, job), job.attempts)
    resumed_at = sync_to_checkpoint(job.id, out_dir, job.owner)
    if resumed_at is not None:
        log.info("job %s resumes from its checkpoint at step %d", job.id, resumed_at)
    recorder.progress({"step": resumed_at or 0, "total_steps": spec.training.steps})
    recorder.flush()
    summary = run_distill(
        spec, inputs, out_dir, teacher_caches(settings, job.project_id), hooks, on_progress=recorder.progress
    )
    return Result(summary=jsonable(summary), out_dir=out_dir)


def benchmark(job: JobInfo, settings: Settings, recorder: JobRecorder, hooks: Hooks) -> Result:
    spec = _validate(BenchmarkSpec, job.spec)
    r = Resolver(settings, job.project_id)
    candidates = []
    for i, c in enumerate(spec.candidates):
        model, adapter, metrics = _candidate_paths(r, c, f"candidates.{i}")
        candidates.append(CandidateInput(c.label, model, adapter, metrics))
    data = {
        name: r.dataset(getattr(spec.data, name), f"data.{name}") if getattr(spec.data, name) else None
        for name in ("text", "mcq", "preference", "prompts")
    }
    inputs = BenchmarkInputs(reference=r.model(spec.reference, "reference"), candidates=candidates, **data)
    out_dir = attempts.prepare(job_output_dir(settings.artifact_root, job), job.attempts)
    summary = run_benchmark(spec, inputs, out_dir, hooks, on_progress=recorder.progress)
    return Result(summary=jsonable(summary), out_dir=out_dir)


def _candidate_paths(r: Resolver, c: BenchmarkCandidate, at: str) -> tuple[Path, Path | None, Path | None]:
    """A candidate's (base model, adapter folder, the adapter's training metrics.jsonl when there is one):
    a model, a model + a distill job's adapter, a distill job's own student + its adapter, or `student_of`."""
    if c.student_of:
        return r.student_of(c.student_of, f"{at}.student_of"), None, None
    adapter = metrics = None
    if c.adapter:
        _, out = r.distill_job_dir(c.adapter, f"{at}.adapter")
        adapter, metrics = r.adapter(c.adapter, f"{at}.adapter"), out / "metrics.jsonl"
    if c.model:
        model = r.model(c.model, f"{at}.model")
    elif c.adapter:
        model = r.student_of(c.adapter, f"{at}.adapter")
    else:  # the spec validates only that one is given: here an empty one
        raise UserError(f"{at}: name a model, an adapter (distill job), or student_of")
    return model, adapter, metrics if metrics and metrics.is_file() else None


def generate(job: JobInfo, settings: Settings, recorder: JobRecorder, hooks: Hooks) -> Result:
    """The playground: each model's answer to one prompt, in the summary (no files)."""
    spec = _validate(GenerateSpec, job.spec)
    r = Resolver(settings, job.project_id)
    inputs = []
    for i, c in enumerate(spec.models):
        at = f"models.{i}"
        model, adapter, _ = _candidate_paths(r, c, at)
        name = c.model or (f"student of {c.student_of}" if c.student_of else f"student of {c.adapter}")
        inputs.append(GenerateInput(c.label, model, adapter, at, name))
    summary = run_generate(spec, inputs, hooks, on_progress=recorder.progress)
    for row, c in zip(summary["answers"], spec.models):
        row.update(adapter=c.adapter, student_of=c.student_of)
    return Result(summary=jsonable(summary))


def compare(job: JobInfo, settings: Settings, recorder: JobRecorder) -> Result:
    """The arms ran as child distill jobs (made when this job was created); their results in one table."""
    from worker import compare as compare_mod

    spec = _validate(CompareSpec, job.spec)
    out_dir = attempts.prepare(job_output_dir(settings.artifact_root, job), job.attempts)
    scored = None
    if spec.domains:
        r = Resolver(settings, job.project_id)
        teachers = [r.model(t.model, f"base.teachers.{i}.model") for i, t in enumerate(spec.base.teachers)]
        domains = {name: r.dataset(ds, f"domains.{name}") for name, ds in spec.domains.items()}
        done = [0]

        def unit() -> None:
            done[0] += 1
            recorder.progress({"step": done[0], "total_steps": len(compare_mod.arm_rows(job.id)) + 1})

        def scored(rows):
            return compare_mod.domain_scores(
                rows,
                teachers,
                domains,
                lambda arm: r.student_of(arm, "arms"),
                lambda arm: r.adapter(arm, "arms"),
                spec.base.training.max_seq_len,
                unit,
            )

    report = compare_mod.write_report(job.id, out_dir, scored)
    recorder.progress({"step": 1, "total_steps": 1})
    return Result(summary=jsonable(report), out_dir=out_dir)
