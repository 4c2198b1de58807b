"""Errors the engine raises on purpose.

A `UserError` means the input is wrong and the user must act (bad file, incompatible models, not enough
memory); the service records it as `error.code = "user_error"`. Anything else escaping the engine is an
internal error.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and where (field, file and line)."""

    code = "user_error"


class Cancelled(Exception):
    """The run stopped because cancellation was requested; its last checkpoint is kept."""

    code = "cancelled"
