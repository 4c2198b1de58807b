"""Distillery SDK: `from distillery import Distillery, AsyncDistillery`.

client = Distillery()                       # DISTILLERY_BASE_URL / DISTILLERY_API_KEY, or the config file
job = client.jobs.create("distill.yaml")
job = client.jobs.wait(job.id, progress=True)
client.artifacts.download(job.id, "adapter/")
"""

from distillery_contract.specs import BenchmarkSpec, DistillSpec, GenerateSpec, TeacherCacheSpec

from ._async_client import AsyncDistillery
from ._client import Distillery
from ._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ChecksumError,
    ConfigError,
    ConflictError,
    DistilleryError,
    JobFailedError,
    JobWarningIssued,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    WaitTimeout,
)
from ._jobfile import SpecError, job_body
from .types import Artifact, Checkpoint, Dataset, Event, Job, JobState, JobWarning, MetricPoint, Model, Progress

__all__ = [
    "Distillery",
    "AsyncDistillery",
    "DistillSpec",
    "TeacherCacheSpec",
    "BenchmarkSpec",
    "GenerateSpec",
    "job_body",
    "Job",
    "JobState",
    "JobWarning",
    "Progress",
    "Dataset",
    "Model",
    "Artifact",
    "Event",
    "MetricPoint",
    "Checkpoint",
    "DistilleryError",
    "ConfigError",
    "APIConnectionError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServerError",
    "JobFailedError",
    "JobWarningIssued",
    "WaitTimeout",
    "ChecksumError",
    "SpecError",
]
__version__ = "0.1.0"
