"""What a job would cost, before it is submitted (`POST /v1/jobs/estimate`, the dashboard's new-job page): the
teacher caches it would reuse or build, the tokens it trains on, and rough memory and time figures.

The figures are first-order, from what the server knows without loading a model (the registered models' info:
weights on disk, layers, hidden size, vocabulary):

- tokens: steps x batch_size x grad_accum x max_seq_len, an upper bound (shorter sequences count less), plus
  the learning-rate search's trials when `learning_rate` is `auto`;
- memory: the student's weights (scaled by the layers kept), plus the gradients and two Adam moments of the
  weights trained (all of them for `full`, a LoRA/DoRA adapter's are negligible), plus the teachers' weights
  when they run in the loop (online, on-policy), plus activations kept for the backward pass
  (batch x length x hidden x layers x 4 bytes x 16) and the vocabulary-wide logits and their gradient
  (batch x length x vocabulary x 4 bytes x 3, twice with a teacher in the loop);
- time: the tokens over the median training speed (`summary.train.tokens_per_second`) of this project's
  earlier succeeded distill jobs with the same student model; none without such a job.

Nothing here is written: an estimate is a read of the caller's project only.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from distillery_contract.jobs import DEFAULT_MAX_SEQ_LEN, DEFAULT_TOP_K
from service.core import lifecycle
from service.core.db.models import Job, Model
from service.core.errors import InvalidFields
from service.domain.jobs import reference_errors

ACTIVATION_FACTOR = 16  # values kept per hidden unit, layer and token for the backward pass (attention + MLP)
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient
ADAM_COPIES = 3  # gradient and two moments per trained weight
DEFAULT_SEARCH_RATES = 5
HISTORY = 20  # earlier jobs looked at for the speed


@dataclass(frozen=True)
class CacheUse:
    teacher: str
    dataset: str
    top_k: int
    max_seq_len: int
    job_id: str | None  # the teacher_cache job reused, None when one would be built
    status: str | None


@dataclass(frozen=True)
class Estimate:
    kind: str
    tokens: int | None
    memory_bytes: int | None
    seconds: float | None
    teacher_caches: list[CacheUse] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def estimate_job(session: Session, project_id: str, kind: str, spec: dict[str, Any]) -> Estimate:
    """The estimate of a validated spec (as JSON values) whose ids must all be the caller's (else InvalidFields,
    as on create)."""
    errors = reference_errors(session, project_id, kind, spec)
    if errors:
        raise InvalidFields(errors)
    if kind == "teacher_cache":
        use = _cache_use(
            session,
            project_id,
            spec["teacher"],
            spec["data"],
            spec.get("top_k", DEFAULT_TOP_K),
            spec.get("max_seq_len", DEFAULT_MAX_SEQ_LEN),
        )
        notes = [f"an identical cache exists: job {use.job_id} ({use.status})"] if use.job_id else []
        return Estimate(kind, None, None, None, [use], notes)
    if kind != "distill":
        return Estimate(kind, None, None, None, [], ["no estimate for this kind of job"])
    return _distill(session, project_id, spec)


def _cache_use(session: Session, project_id: str, teacher: str, dataset: str, top_k: int, max_seq_len: int) -> CacheUse:
    existing = lifecycle.find_cache_job(session, project_id, teacher, dataset, top_k, max_seq_len)
    return CacheUse(
        teacher, dataset, top_k, max_seq_len, existing.id if existing else None, existing.status if existing else None
    )


def _distill(session: Session, project_id: str, spec: dict[str, Any]) -> Estimate:
    training, loss = spec["training"], spec.get("loss", {})
    steps, batch = int(training["steps"]), int(training.get("batch_size", 4))
    accum, length = int(training.get("grad_accum", 1)), int(training.get("max_seq_len", DEFAULT_MAX_SEQ_LEN))
    notes: list[str] = []
    trial_steps = 0
    if training.get("learning_rate", "auto") == "auto":
        search = training.get("lr_search") or {}
        rates = len(search.get("rates") or []) or DEFAULT_SEARCH_RATES
        trial_steps = rates * (search.get("steps") or min(20, max(4, steps // 10)))
        notes.append(f"learning_rate auto: {trial_steps} trial steps before training ({rates} rates)")
    tokens = (steps + trial_steps) * batch * accum * length
    notes.append("tokens: an upper bound (every sequence at max_seq_len)")

    mode = spec.get("teacher_mode", "offline")
    caches: list[CacheUse] = []
    if mode == "offline":
        datasets = [spec["data"]["train"]] + (
            [spec["data"]["valid"]] if isinstance(spec["data"].get("valid"), str) else []
        )
        top_k = int(loss.get("top_k", DEFAULT_TOP_K))
        caches = [
            _cache_use(session, project_id, t["model"], ds, top_k, length) for t in spec["teachers"] for ds in datasets
        ]
        built = sum(1 for c in caches if c.job_id is None)
        notes.append(
            f"{len(caches) - built} teacher cache(s) reused, {built} built first"
            + (" (the time below leaves their building out)" if built else "")
        )

    student = session.get(Model, spec["student"]["model"])
    info = dict(student.info or {}) if student else {}
    memory = _memory(spec, info, [session.get(Model, t["model"]) for t in spec["teachers"]], batch, length, mode)
    if memory is None:
        notes.append("memory: unknown (the student's size is not recorded)")
    else:
        notes.append("memory: first-order (weights, optimizer state, activations, logits), not a measurement")

    seconds = None
    speeds = _speeds(session, project_id, spec["student"]["model"])
    if speeds:
        speed = statistics.median(speeds)
        seconds = tokens / speed
        notes.append(f"time: at {speed:,.0f} tokens/s, the median of {len(speeds)} earlier run(s) of this student")
    else:
        notes.append("time: unknown until this project has a finished distill job with this student")
    return Estimate("distill", tokens, memory, seconds, caches, notes)


def _number(info: dict, key: str) -> int | None:
    value = info.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _memory(spec: dict, info: dict, teachers: list[Model | None], batch: int, length: int, mode: str) -> int | None:
    weights = _number(info, "weights_bytes")
    if weights is None:
        return None
    layers, hidden, vocab = (_number(info, k) for k in ("num_hidden_layers", "hidden_size", "vocab_size"))
    keep = spec["student"].get("keep_layers")
    kept = len(keep) if keep and layers else layers
    if keep and layers:
        weights = int(weights * min(1.0, len(keep) / layers))
    total = weights
    if spec.get("adapter", {}).get("type") == "full":
        total += ADAM_COPIES * weights
    if kept and hidden:
        total += batch * length * hidden * kept * 4 * ACTIVATION_FACTOR
    logit_sets = 1
    if mode in ("online", "on_policy"):
        total += sum(_number(dict(t.info or {}), "weights_bytes") or 0 for t in teachers if t is not None)
        logit_sets = 2
    if vocab:
        total += batch * length * vocab * 4 * LOGIT_COPIES * logit_sets
    return int(total)


def _speeds(session: Session, project_id: str, student_model: str) -> list[float]:
    rows = session.scalars(
        select(Job)
        .where(Job.project_id == project_id, Job.kind == "distill", Job.status == lifecycle.SUCCEEDED)
        .order_by(Job.id.desc())
        .limit(HISTORY * 5)
    ).all()
    speeds = []
    for row in rows:
        if (row.spec or {}).get("student", {}).get("model") != student_model:
            continue
        speed = ((row.summary or {}).get("train") or {}).get("tokens_per_second")
        if isinstance(speed, (int, float)) and speed > 0:
            speeds.append(float(speed))
        if len(speeds) >= HISTORY:
            break
    return speeds
