"""Let MLX keep its freed buffers for reuse on the CPU while a model trains, instead of returning them.

Why: MLX's CPU allocator caches freed buffers up to 32 MiB by default. A training step frees and allocates
the same large buffers every time (the [tokens, vocabulary] logits alone are 100 MB at 512 tokens of
SmolLM2), so each one went back to the system and the next step page-faulted fresh, zeroed pages in: a
fifth of a 1 x 512 step on a 2-core x86 VM (the kernel's `clear_page` in a profile; bench/peer_speed.py).
With a larger cache every step reuses the last one's buffers.

Only while training and caching (`reusing_buffers()` around those jobs): a benchmark loads model after model
and forwards batches of many shapes, and a large cache there only held the freed ones (its process's peak
RSS grew from 1.7 to 5 GB in bench/benchmark_cost.py). Cached bytes are not MLX's active memory (peak-memory
figures are unchanged), and MLX frees the cache before an allocation would pass its memory limit.

The limit: a quarter of MLX's memory limit, or `DISTILLERY_MLX_CACHE_MB`. On a GPU MLX's own default (its
memory limit) is kept. Both functions import MLX: call them after `blas.enable()`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_FRACTION = 4  # of MLX's memory limit: room for a step's transients, not a claim on the machine


def enable() -> str:
    """Raise MLX's CPU buffer cache limit for the rest of the process (a bench, `distillery-server distill`).
    Returns what it did."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return "unchanged: MLX runs on a GPU (its own cache default)"
    wanted = os.environ.get("DISTILLERY_MLX_CACHE_MB", "").strip()
    try:
        limit = int(float(wanted) * 2**20) if wanted else mx.get_memory_limit() // _FRACTION
    except ValueError:
        return f"unchanged: DISTILLERY_MLX_CACHE_MB={wanted!r} is not a number of MiB"
    mx.set_cache_limit(limit)
    return f"MLX CPU buffer cache limit {limit / 2**20:.0f} MiB"


@contextmanager
def reusing_buffers() -> Iterator[None]:
    """The raised limit inside; MLX's limit as it was afterwards, with the cache emptied."""
    import mlx.core as mx

    before = mx.set_cache_limit(0)
    mx.set_cache_limit(before)
    enable()
    try:
        yield
    finally:
        mx.set_cache_limit(before)
        mx.clear_cache()
