"""Errors the engine raises on purpose.

A `UserError` means the input is wrong and the user must act (bad file, incompatible models, not enough
memory); the service records it as `error.code = "user_error"` (`"resource"` for a full disk). Anything else escaping the engine is an
internal error.
"""

from distillery_contract.jobs import RESOURCE, USER_ERROR


class UserError(Exception):
    """Bad input: the message says what is wrong and where (field, file and line)."""

    code = USER_ERROR


class ResourceError(UserError):
    """The machine lacks what the run needs (disk space): the message names the path, what is needed and what
    is there. Recorded as `error.code = "resource"`: the input may be fine, the operator must act."""

    code = RESOURCE


class Cancelled(Exception):
    """The run stopped because cancellation was requested; its last checkpoint is kept."""

    code = "cancelled"
