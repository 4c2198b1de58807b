"""Jobs as the API, the workers and the SDK name them: kinds, statuses, error codes, shared defaults.

A job's life:

    queued ──▶ running ──▶ succeeded | failed | cancelled
                  │  ▲ (a lost worker's job goes back to queued and resumes from its checkpoint)
                  ▼  │
           cancel_requested ──▶ cancelled
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# ------------------------------------------------------------------------------------------------ kinds

JobKind = Literal["distill", "teacher_cache", "benchmark", "generate", "compare"]
DISTILL: Final = "distill"
TEACHER_CACHE: Final = "teacher_cache"
BENCHMARK: Final = "benchmark"
GENERATE: Final = "generate"  # the playground: one prompt, each model's answer
COMPARE: Final = "compare"  # one distillation run several ways (single teachers, equal, adaptive), side by side
JOB_KINDS: tuple[str, ...] = get_args(JobKind)

# --------------------------------------------------------------------------------------------- statuses

JobStatus = Literal["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"]
QUEUED: Final = "queued"
RUNNING: Final = "running"
CANCEL_REQUESTED: Final = "cancel_requested"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL: tuple[str, ...] = (SUCCEEDED, FAILED, CANCELLED)  # finished: the status never changes again
ACTIVE: tuple[str, ...] = (RUNNING, CANCEL_REQUESTED)  # a worker holds the job

# ------------------------------------------------------------------------------------------ error codes

# `error.code` of a failed job: what must change for it to succeed.
ErrorCode = Literal["user_error", "resource", "internal_error"]
USER_ERROR: Final = "user_error"  # the input is wrong (a field, a file and line, incompatible models)
RESOURCE: Final = "resource"  # the machine lacks what the run needs (disk space): the operator acts
INTERNAL_ERROR: Final = "internal_error"  # anything else: a bug or an outage, not the user's input
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)

# ------------------------------------------------------------------------------------- shared defaults

DEFAULT_TOP_K: Final = 64  # teacher log-probs kept per position (a distill loss, a teacher cache)
DEFAULT_MAX_SEQ_LEN: Final = 512  # tokens per training / cache / benchmark sequence
MAX_STEPS: Final = 10_000_000  # training steps, also their sum over stages (stored as a 32-bit int)
MAX_GENERATE_TOKENS: Final = 4096  # the longest answer a generate job writes per model

# The rows a distill job's `evaluate` benchmark names itself; its extra candidates may not take them.
DISTILLED_LABEL: Final = "distilled"  # the distilled student (the distill job's adapter)
BASELINE_LABEL: Final = "student (before)"  # the student as it was before training
REFERENCE_LABEL: Final = "reference"  # the reference (the first teacher)
EVALUATE_LABELS: tuple[str, ...] = (DISTILLED_LABEL, BASELINE_LABEL, REFERENCE_LABEL)
