"""Compiled forms of a transformer's exp-heavy parts, forward and backward, for MLX on the CPU.

Why: on the CPU, MLX runs an uncompiled `exp` / `sigmoid` / `softmax` as a scalar loop (~20 ns per element
on x86-64), and differentiating even a compiled function runs its backward uncompiled. In a SmolLM2 forward
the SiLU and the attention's softmax took more time than all the matrix products (bench/peer_speed.py).
Here each of them is one `mx.compile`d function forward and one backward (an `mx.custom_function` whose vjp
is compiled too), which `cpu_jit.enable()` lets the compiler vectorise: ~5-10x faster per element.

- `swiglu(gate, up)` = silu(gate) · up, with d/dgate = up · σ(1 + gate(1 − σ)) and d/dup = gate · σ.
- `softmax_masked(scores, mask)` = softmax(scores + mask) over the last axis (mask additive, broadcast),
  with d/dscores = p ⊙ (c − Σ c ⊙ p); `mask` gets no gradient.
- `scaled_dot_product_attention` has mlx-lm's signature: for a forward without a KV cache (training,
  evaluation, scoring), q·kᵀ and p·v as batched matmuls with the key/value heads broadcast over their query
  group (no copies), and `softmax_masked` between; a long causal one in blocks of query positions, each
  against the keys up to its end only (the masked upper triangle is skipped); with a cache, attention sinks or an explicit mask array it
  calls mlx-lm's own (generation is not what this speeds up).

`install(model)` swaps these in for the names mlx-lm's model module calls (`swiglu`,
`scaled_dot_product_attention`) when MLX runs on the CPU; models of other architectures, and every model on
a GPU (where MLX's own kernels are fused), are left alone. The results equal MLX's own ops to float32
rounding (tests/engine/test_fused.py).

Differentiate them inside `mx.compile` (the training step is compiled on the CPU: train.CompiledGradients).
Under a plain `mx.grad`, MLX runs a custom function's forward again, uncompiled, to give its vjp the
outputs, which costs more than it saves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations as mlx_activations
from mlx_lm.models import base as mlx_base

__all__ = [
    "bucket_logits",
    "exp_shifted",
    "logsumexp_last",
    "install",
    "uninstall",
    "installed",
    "scaled_dot_product_attention",
    "softmax_masked",
    "swiglu",
]

# ----------------------------------------------------------------------------------------------- SwiGLU


@partial(mx.compile, shapeless=True)
def _swiglu_forward(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up


# Two kernels, not one with two outputs: MLX's CPU compiler leaves a multi-output graph unfused.
# Each of the three kernels writes σ(gate) its own way, on purpose: inside the compiled training step MLX
# merges equal subexpressions across the whole graph, so one `mx.sigmoid(gate)` written three times became
# one node with three consumers, which no kernel can fuse; it then ran as MLX's scalar Sigmoid and wrote
# [tokens, ffn] floats to memory (half the SwiGLU's time in a profile of the step). All three are exact in
# float32: 1/(1 + e^-x) and t/(1 + t), t = e^min(x, 80), over- and underflow to the right limits.
@partial(mx.compile, shapeless=True)
def _swiglu_grad_gate(gate: mx.array, up: mx.array, cotangent: mx.array) -> mx.array:
    s = 1.0 / (1.0 + mx.exp(-gate))
    return cotangent * up * (s + gate * s * (1.0 - s))


@partial(mx.compile, shapeless=True)
def _swiglu_grad_up(gate: mx.array, cotangent: mx.array) -> mx.array:
    t = mx.exp(mx.minimum(gate, 80.0))
    return cotangent * gate * (t / (1.0 + t))


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) · up."""
    return _swiglu_forward(gate, up)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    return _swiglu_grad_gate(gate, up, cotangent), _swiglu_grad_up(gate, cotangent)


# ---------------------------------------------------------------------------------------------- softmax


@partial(mx.compile, shapeless=True)
def _softmax_forward(scores: mx.array, mask: mx.array) -> mx.array:
    x = scores + mask
    e = mx.exp(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@partial(mx.compile, shapeless=True)
def _softmax_backward(p: mx.array, cotangent: mx.array) -> mx.array:
    return p * (cotangent - mx.sum(cotangent * p, axis=-1, keepdims=True))


@mx.custom_function
def softmax_masked(scores: mx.array, mask: mx.array) -> mx.array:
    """softmax(scores + mask) over the last axis; `mask` is additive (0 or -inf) and broadcast."""
    return _softmax_forward(scores, mask)


@softmax_masked.vjp
def _softmax_vjp(primals, cotangent, output):
    return _softmax_backward(output, cotangent), mx.zeros_like(primals[1])


# --------------------------------------------------------------------------------- exp for the loss


@partial(mx.compile, shapeless=True)
def _exp_shifted_forward(x: mx.array, shift: mx.array) -> mx.array:
    return mx.exp(x - shift)


@mx.custom_function
def exp_shifted(x: mx.array, shift: mx.array) -> mx.array:
    """exp(x − shift), `shift` broadcast and given no gradient (a log-sum-exp's stop-gradient max)."""
    return _exp_shifted_forward(x, shift)


@exp_shifted.vjp
def _exp_shifted_vjp(primals, cotangent, output):
    return cotangent * output, mx.zeros_like(primals[1])


# ------------------------------------------------------------------ the student on the teacher's buckets

# exp(x − shift) for the rest's sum is exact down to a rest of e^-87 of the largest logit's mass, where
# float32 underflows; below that the sum is held at this floor (finite values and gradients), not −inf.
_REST_FLOOR = 1e-37


@partial(mx.compile, shapeless=True)
def _scaled_exp_shifted(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return scale * mx.exp(x - shift)


@mx.custom_function
def bucket_logits(z: mx.array, ids: mx.array) -> mx.array:
    """[..., k + 1]: z at the k `ids` of each row, then log Σ exp(z) over the row's other entries (the
    tail), for float32 logits z [..., V] and int32 ids [..., k]; normalising them gives log q on the buckets.

    Why a custom function: it passes over V three times forward (max, exp, sum) and once backward, where
    MLX's own ops (a masked copy of z, a log-sum-exp, a gather and the scatters of their gradients) took a
    dozen passes over the [tokens, V] arrays. Backward: ∂tail/∂z_j = exp(z_j − tail) off the ids, and each
    id's own cotangent at the ids (summed where an id repeats in a row, e.g. a padding row's dummies).
    """
    top = mx.take_along_axis(z, ids, axis=-1)
    shift = mx.stop_gradient(mx.max(z, axis=-1, keepdims=True))
    e = mx.put_along_axis(_exp_shifted_forward(z, shift), ids, mx.array(0.0, z.dtype), axis=-1)
    tail = shift + mx.log(mx.maximum(mx.sum(e, axis=-1, keepdims=True), _REST_FLOOR))
    return mx.concatenate([top, tail], axis=-1)


@bucket_logits.vjp
def _bucket_logits_vjp(primals, cotangent, output):
    z, ids = primals
    c_top, c_tail = cotangent[..., :-1], cotangent[..., -1:]
    grad = _scaled_exp_shifted(z, output[..., -1:], c_tail)  # the tail's share, everywhere; the ids overwritten:
    repeats = (ids[..., :, None] == ids[..., None, :]).astype(c_top.dtype)  # [..., k, k]
    at_ids = (repeats @ c_top[..., None])[..., 0]  # each id's cotangents summed over its repeats
    return mx.put_along_axis(grad, ids, at_ids, axis=-1), mx.zeros_like(ids)


def logsumexp_last(x: mx.array) -> mx.array:
    """logsumexp over the last axis (keepdims): the loss's pass over the vocabulary, through the compiled exp
    on the CPU, MLX's own op elsewhere."""
    if mx.default_device() != mx.cpu:
        return mx.logsumexp(x, axis=-1, keepdims=True)
    m = mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
    e: mx.array = exp_shifted(x, m)  # type: ignore[assignment]  # custom_function is untyped
    return m + mx.log(mx.sum(e, axis=-1, keepdims=True))


# -------------------------------------------------------------------------------------------- attention


def causal_mask(queries: int, keys: int, dtype: mx.Dtype) -> mx.array:
    """[queries, keys] additive mask: query i (the last `queries` of `keys` positions) sees keys <= its own.
    Made per call, not cached: a cached array made inside `mx.compile`'s trace would outlive it."""
    q = mx.arange(keys - queries, keys)[:, None]
    k = mx.arange(keys)[None, :]
    return mx.where(k <= q, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` (same arguments) through the compiled softmax."""
    if cache is not None or sinks is not None or not (mask is None or isinstance(mask, str)):
        return _ORIGINAL["scaled_dot_product_attention"](
            queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks
        )
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unknown attention mask {mask!r}")
    b, heads, length, dim = queries.shape
    kv_heads, kv_length = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv_heads, heads // kv_heads, length, dim)
    k, v = keys[:, :, None], values[:, :, None]  # broadcast over each query group
    if mask != "causal" or length < 2 * CAUSAL_BLOCK:
        return _attend(q, k, v, mask == "causal").reshape(b, heads, length, dim)
    # Causal, long: query block i needs only the keys up to its own end, so the scores above the diagonal
    # blocks are neither computed nor softmaxed (3/8 of the work saved at 4 blocks, 1/4 at 2).
    start = kv_length - length  # the queries are the last `length` positions
    bounds = list(range(0, length, CAUSAL_BLOCK))
    if length - bounds[-1] < CAUSAL_BLOCK // 2:  # no sliver of a last block
        bounds.pop()
    ends = bounds[1:] + [length]
    outs = [
        _attend(q[..., lo:hi, :], k[..., : start + hi, :], v[..., : start + hi, :], True)
        for lo, hi in zip(bounds, ends)
    ]
    return mx.concatenate(outs, axis=-2).reshape(b, heads, length, dim)


CAUSAL_BLOCK = 128  # query positions per block of a long causal attention


def _attend(q: mx.array, k: mx.array, v: mx.array, causal: bool) -> mx.array:
    """softmax(q·kᵀ + mask)·v for [b, kv_heads, group, queries, dim] queries against the last keys."""
    scores = q @ k.swapaxes(-1, -2)  # [b, kv_heads, group, queries, keys]
    if causal:
        additive = causal_mask(q.shape[-2], k.shape[-2], scores.dtype)
    else:
        additive = mx.zeros((1,), dtype=scores.dtype)
    p: mx.array = softmax_masked(scores, additive)  # type: ignore[assignment]  # custom_function is untyped
    return p @ v


# ------------------------------------------------------------------------------------------- installing

_ORIGINAL: dict[str, Callable[..., mx.array]] = {
    "swiglu": mlx_activations.swiglu,
    "scaled_dot_product_attention": mlx_base.scaled_dot_product_attention,
}
_FUSED = {"swiglu": swiglu, "scaled_dot_product_attention": scaled_dot_product_attention}


def install(model: nn.Module) -> list[str]:
    """On the CPU, point the model's mlx-lm module at the compiled forms; returns the names swapped."""
    if mx.default_device() != mx.cpu:
        return []
    module = sys.modules.get(type(model).__module__)
    swapped = []
    for name, original in _ORIGINAL.items():
        if module is not None and getattr(module, name, None) is original:
            setattr(module, name, _FUSED[name])
            swapped.append(name)
        elif module is not None and getattr(module, name, None) is _FUSED[name]:
            swapped.append(name)
    return swapped


def uninstall(model: nn.Module) -> None:
    """Back to mlx-lm's own functions (for comparisons)."""
    module = sys.modules.get(type(model).__module__)
    for name, fused in _FUSED.items():
        if module is not None and getattr(module, name, None) is fused:
            setattr(module, name, _ORIGINAL[name])


def installed(model: nn.Module) -> list[str]:
    module = sys.modules.get(type(model).__module__)
    return [n for n, f in _FUSED.items() if module is not None and getattr(module, n, None) is f]
