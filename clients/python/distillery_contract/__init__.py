"""The Distillery contract: what the API, the workers and the SDK agree on, defined once.

- `specs`: the job specs (`DistillSpec`, `TeacherCacheSpec`, `BenchmarkSpec` and their parts), their bounds
  and presets, as the API validates them and the engine runs them;
- `records`: the dataset formats, their fields, and the streaming JSONL validation of a dataset file;
- `jobs`: job kinds, statuses, error codes and the defaults the service relies on.

Pure Python and pydantic: no MLX, no numpy, no HTTP. Shipped by the `distillery-client` distribution; the server
depends on it.
"""

from .jobs import (
    ACTIVE,
    BENCHMARK,
    CANCEL_REQUESTED,
    CANCELLED,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_TOP_K,
    DISTILL,
    ERROR_CODES,
    EVALUATE_LABELS,
    FAILED,
    INTERNAL_ERROR,
    JOB_KINDS,
    JOB_STATUSES,
    MAX_STEPS,
    QUEUED,
    RESOURCE,
    RUNNING,
    SUCCEEDED,
    TEACHER_CACHE,
    TERMINAL,
    USER_ERROR,
    ErrorCode,
    JobKind,
    JobStatus,
)
from .records import (
    FORMATS,
    OPTIONAL,
    REQUIRED,
    TRAINABLE_FORMATS,
    DatasetError,
    DatasetFormat,
    JsonlChecker,
    detect_format,
)
from .specs import (
    PRESETS,
    SPEC_MODELS,
    AdapterSpec,
    BenchmarkCandidate,
    BenchmarkData,
    BenchmarkSpec,
    BenchmarkSpeed,
    DataSpec,
    DistillSpec,
    DivergenceGuardSpec,
    EvaluateSpec,
    LossOverride,
    LossSpec,
    LRSearchSpec,
    OutputSpec,
    ParamGroup,
    QuantizeSpec,
    StageSpec,
    StudentSpec,
    TeacherCacheSpec,
    TeacherSpec,
    TrainingSpec,
    apply_preset,
)

__all__ = [
    # specs
    "DistillSpec", "TeacherCacheSpec", "BenchmarkSpec", "SPEC_MODELS", "PRESETS", "apply_preset",
    "StudentSpec", "QuantizeSpec", "TeacherSpec", "DataSpec", "LossSpec", "LossOverride", "AdapterSpec",
    "ParamGroup", "StageSpec", "LRSearchSpec", "DivergenceGuardSpec", "TrainingSpec", "OutputSpec",
    "BenchmarkCandidate", "BenchmarkData", "BenchmarkSpeed", "EvaluateSpec",
    # records
    "FORMATS", "TRAINABLE_FORMATS", "REQUIRED", "OPTIONAL", "DatasetFormat", "DatasetError", "JsonlChecker",
    "detect_format",
    # jobs
    "JobKind", "JOB_KINDS", "DISTILL", "TEACHER_CACHE", "BENCHMARK",
    "JobStatus", "JOB_STATUSES", "QUEUED", "RUNNING", "CANCEL_REQUESTED", "SUCCEEDED", "FAILED", "CANCELLED",
    "TERMINAL", "ACTIVE",
    "ErrorCode", "ERROR_CODES", "USER_ERROR", "RESOURCE", "INTERNAL_ERROR",
    "DEFAULT_TOP_K", "DEFAULT_MAX_SEQ_LEN", "MAX_STEPS", "EVALUATE_LABELS",
]
