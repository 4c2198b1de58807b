"""Let MLX keep its freed buffers for reuse on the CPU instead of handing them back to the system.

Why: MLX's CPU allocator caches freed buffers up to 32 MiB by default. A training step frees and allocates
the same large buffers every time (the [tokens, vocabulary] logits alone are 100 MB at 512 tokens of
SmolLM2), so each one went back to the system and the next step page-faulted fresh, zeroed pages in: a
fifth of a 1 x 512 step on a 2-core x86 VM (the kernel's `clear_page` in a profile; bench/peer_speed.py). With
a larger cache every step reuses the last one's buffers. Cached bytes are not MLX's active memory (peak
memory figures are unchanged) and `mx.clear_cache()`, which the engine calls between phases, still frees them.

`enable()` sets the cache limit to a quarter of MLX's memory limit, or `DISTILLERY_MLX_CACHE_MB`; on a GPU
MLX's own default (its memory limit) is kept. Call it after `blas.enable()` (it imports MLX).
"""

from __future__ import annotations

import os

_FRACTION = 4  # of MLX's memory limit: room for a step's transients, not a claim on the machine


def enable() -> str:
    """Raise MLX's CPU buffer cache limit; idempotent. Returns what it did."""
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
