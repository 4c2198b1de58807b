"""Cancel points: where a long phase of a run looks at its caller's stop flag, so a cancellation ends the run
within about a second wherever it is (an evaluation, the learning-rate search, a step's micro-batches), not
only at the next training step.

The caller (the worker, `worker.runs`) says what stops the run now for the extent of a block:

    with cancel.stop_now_when(lambda: lease.cancel_requested or lease.lost):
        run_distill(...)

and the engine asks at its batch boundaries (`Split.batch`, the on-policy sampler), through `point()`, which
raises `Cancelled`. Outside such a block (the local `distillery-server distill`, the tests) it does nothing.
The flag is kept in a context variable: per thread, so two runs in one process never see each other's.

The training loop still looks at `Hooks.should_stop` between steps, where it checkpoints first; a cancel point
raises where it is, so the run keeps the checkpoints it has (never a half-written one: checkpoints are written
between steps). A worker's own shutdown is left to the step boundary (it checkpoints there and hands the job
back), so only a user's cancel or a lost lease stops a run mid-phase.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import Cancelled

_stop_now: ContextVar[Callable[[], bool] | None] = ContextVar("distillery_stop_now", default=None)


@contextmanager
def stop_now_when(predicate: Callable[[], bool]) -> Iterator[None]:
    """Within the block, `point()` raises `Cancelled` once `predicate()` is true."""
    token = _stop_now.set(predicate)
    try:
        yield
    finally:
        _stop_now.reset(token)


def point(where: str = "") -> None:
    """A cancel point: raise `Cancelled` if the caller asked the run to stop now."""
    predicate = _stop_now.get()
    if predicate is not None and predicate():
        raise Cancelled("cancelled" + (f" during {where}" if where else ""))
