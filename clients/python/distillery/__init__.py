"""Distillery SDK: `from distillery import Distillery`."""

from ._base import (APIError, AuthenticationError, BadRequestError, ConflictError, DistilleryError, JobFailedError,
                    NotFoundError, RateLimitError, ServerError)
from ._client import Distillery
from .types import Artifact, Dataset, Event, Job, MetricPoint, Model

__all__ = ["Distillery", "DistilleryError", "APIError", "BadRequestError", "AuthenticationError", "NotFoundError",
           "ConflictError", "RateLimitError", "ServerError", "JobFailedError", "Job", "Dataset", "Model", "Artifact",
           "Event", "MetricPoint"]
__version__ = "0.1.0"
