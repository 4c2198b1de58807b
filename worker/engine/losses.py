"""Distillation losses in MLX: divergences, temperature, dense and sparse (cached) teachers, the training loss.

Conventions: p is the teacher, q the student, both given as normalised log-probabilities over the last
axis. Everything is computed in float32 (inputs are cast) and in log space, so that 0·log 0 = 0, an exact
zero in p gives neither NaN values nor NaN gradients, and extreme logits stay finite.

The one deliberate deviation from exact arithmetic: the teacher's log-probabilities are floored at
`LOG_PROB_FLOOR` (-1e4). exp(-1e4) is 0 in float32, so p itself is unchanged; only log p of a
(numerically) zero-probability token is bounded, which keeps the reverse KL and its gradient finite where
the exact value is +inf (the student puts mass where the teacher has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from distillery_contract.specs import LossSpec

from . import fused

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")

LOG_PROB_FLOOR = -1e4
"""Lower bound on the teacher's log-probabilities (see the module docstring)."""

# --------------------------------------------------------------------------------------------------------
# Divergences between two log-probability vectors


def _kl(log_a: mx.array, log_b: mx.array) -> mx.array:
    """KL(a‖b) = Σ a (log a − log b) over the last axis, with 0·log 0 = 0."""
    a = mx.exp(log_a)
    support = a > 0
    # Zero both logs outside a's support *before* subtracting, so neither the value nor the gradient ever
    # sees -inf - (-inf) or 0 · inf.
    diff = mx.where(support, log_a, 0.0) - mx.where(support, log_b, 0.0)
    return mx.sum(a * diff, axis=-1)


def _log_mixture(log_p: mx.array, log_q: mx.array, weight: float) -> mx.array:
    """log(w·p + (1 − w)·q), computed as a logaddexp of the two shifted log-probabilities."""
    if weight == 0.0:
        return log_q
    return mx.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def divergence(kind: str, log_p: mx.array, log_q: mx.array, *, beta: float = 0.5, skew: float = 0.1) -> mx.array:
    """Per-position divergence between teacher p and student q over the last axis.

    kinds:
      forward_kl  KL(p‖q) = Σ p (log p − log q)
      reverse_kl  KL(q‖p) = Σ q (log q − log p)
      jsd         generalised JSD (GKD, Agarwal et al. 2024): m = β·p + (1−β)·q,
                  JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m), 0 < β < 1
      skew_kl     skew forward KL (DistiLLM, Ko et al. 2024): KL(p ‖ s·p + (1−s)·q), 0 ≤ s < 1
      tvd         ½ Σ |p − q|

    Returns an array of the inputs' shape minus the last axis, in float32.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {', '.join(DIVERGENCE_KINDS)}")
    log_p = mx.maximum(log_p.astype(mx.float32), LOG_PROB_FLOOR)
    log_q = log_q.astype(mx.float32)

    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew_kl":
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew_kl needs 0 <= skew < 1, got {skew}")
        return _kl(log_p, _log_mixture(log_p, log_q, skew))
    # tvd
    return 0.5 * mx.sum(mx.abs(mx.exp(log_p) - mx.exp(log_q)), axis=-1)


# --------------------------------------------------------------------------------------------------------
# Temperature and the dense (teacher in the loop) loss


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_softmax_t(logits: mx.array, temperature: float = 1.0) -> mx.array:
    """log_softmax(logits / T) over the last axis, in float32."""
    _check_temperature(temperature)
    z = logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def dense_divergence(
    student_logits: mx.array, teacher_logits: mx.array, kind: str, temperature: float = 1.0, **kw
) -> mx.array:
    """T² · D(softmax(t/T) ‖ softmax(s/T)) per position.

    The T² factor (Hinton et al. 2015) keeps gradient magnitudes independent of T. `kw`: beta, skew.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocabularies differ ({student_logits.shape[-1]} vs {teacher_logits.shape[-1]})"
        )
    log_p = log_softmax_t(mx.stop_gradient(teacher_logits), temperature)
    log_q = log_softmax_t(student_logits, temperature)
    return divergence(kind, log_p, log_q, **kw) * temperature**2


# --------------------------------------------------------------------------------------------------------
# The sparse (cached top-k teacher) loss


def _clean_logprob(x: mx.array) -> mx.array:
    """Cast to float32 and clip to [LOG_PROB_FLOOR, 0]; NaN (log of a negative rounding residue) → floor."""
    x = x.astype(mx.float32)
    return mx.where(mx.isnan(x), LOG_PROB_FLOOR, mx.clip(x, LOG_PROB_FLOOR, 0.0))


def teacher_buckets(topk_logprobs: mx.array, tail_logmass: mx.array, temperature: float, vocab_size: int) -> mx.array:
    """The teacher on k + 1 buckets at temperature T: [..., k] cached tokens, then [..., 1] the tail.

    The tail's internal shape is not cached, so it is taken as uniform over the n = V − k uncached tokens:
    each has log-prob u = tail_logmass − log n at T = 1. Softening divides every log-prob by T and
    renormalises over all V tokens:

        bucket_i    = topk_logprobs_i / T − log Z
        bucket_tail = log n + u / T − log Z  =  tail_logmass / T + (1 − 1/T)·log n − log Z

    with log Z the logsumexp of the unnormalised buckets. At T = 1 this is (topk_logprobs, tail_logmass),
    renormalised (a no-op for a clean cache; it absorbs float16 rounding and padding dummies). For T > 1
    the uniform tail is an upper bound on the true softened tail mass (a flat tail gains the most from
    softening), so the tail bucket errs on the large side.
    """
    _check_temperature(temperature)
    k = topk_logprobs.shape[-1]
    if k > vocab_size:
        raise ValueError(f"top-k ({k}) exceeds the vocabulary size ({vocab_size})")
    log_n_tail = math.log(max(vocab_size - k, 1))  # k = V: empty tail, its (floored) mass stays ~0
    top = _clean_logprob(topk_logprobs) / temperature
    tail = _clean_logprob(tail_logmass)[..., None] / temperature + (1.0 - 1.0 / temperature) * log_n_tail
    buckets = mx.concatenate([top, tail], axis=-1)
    return buckets - mx.logsumexp(buckets, axis=-1, keepdims=True)


def student_buckets(student_logits: mx.array, topk_ids: mx.array, temperature: float) -> mx.array:
    """The student on the teacher's k + 1 buckets: log q at the top-k ids, then the log-mass of the rest.

    The tail is summed from the remaining logits themselves (fused.bucket_logits: the top-k zeroed out of
    one exp pass over V), not taken as log(1 − Σ q_topk), so it stays exact as q_tail → 0 (down to e^-87
    of the largest logit's mass, float32's range). Normalising over the k + 1 bucket terms gives the full
    logsumexp for free.
    """
    _check_temperature(temperature)
    z = student_logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    buckets: mx.array = fused.bucket_logits(z, topk_ids.astype(mx.int32))  # type: ignore[assignment]
    return buckets - mx.logsumexp(buckets, axis=-1, keepdims=True)


def sparse_divergence(
    student_logits: mx.array,
    topk_ids: mx.array,
    topk_logprobs: mx.array,
    tail_logmass: mx.array,
    kind: str,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    **kw,
) -> mx.array:
    """T² · D(p ‖ q) per position, from a cached top-k teacher, on k + 1 buckets.

    Tail treatment: both distributions are collapsed onto k + 1 buckets, the k cached tokens plus one
    "tail" bucket holding everything else, and `divergence` is computed over these buckets (teacher:
    `teacher_buckets`, student: `student_buckets`). Collapsing is a coarse-graining, so by the
    data-processing inequality the bucketed value is a lower bound on the full-vocabulary one for the
    f-divergences (all kinds here); it is exact when k = V − 1 and close when the teacher's tail is tiny.

    Inputs: topk_ids [..., k] (integer), topk_logprobs [..., k] (float16/32, log-probs at T = 1),
    tail_logmass [...] = log(1 − Σ exp(topk_logprobs)). vocab_size is the teacher's vocabulary size V, used
    only by the uniform-tail model for T ≠ 1 (default: the student's last dimension). Padded positions
    holding dummies (ids 0, log-probs 0, any tail) give finite values; masking them is the caller's job.

    For T ≠ 1 the teacher's tail is modelled as uniform (see `teacher_buckets`); for T > 1 that is an upper
    bound on the true softened tail mass.
    """
    if vocab_size is None:
        vocab_size = student_logits.shape[-1]
    log_p = mx.stop_gradient(teacher_buckets(topk_logprobs, tail_logmass, temperature, vocab_size))
    log_q = student_buckets(student_logits, topk_ids, temperature)
    return divergence(kind, log_p, log_q, **kw) * temperature**2


# --------------------------------------------------------------------------------------------------------
# Teachers and their weighting


@dataclass(frozen=True)
class DenseTeacher:
    """A teacher run in the loop: its full logits [B, L, V] and, for hidden-state hints (hidden.py), the outputs
    of the layers they read [B, L, d] each."""

    logits: mx.array
    hidden: tuple[mx.array, ...] = ()

    def divergence(self, student_logits: mx.array, kind: str, temperature: float, **kw) -> mx.array:
        return dense_divergence(student_logits, self.logits, kind, temperature, **kw)


@dataclass(frozen=True)
class SparseTeacher:
    """A cached teacher: top-k ids and log-probs [B, L, k], tail log-mass [B, L], vocabulary size V."""

    topk_ids: mx.array
    topk_logprobs: mx.array
    tail_logmass: mx.array
    vocab_size: int

    def divergence(self, student_logits: mx.array, kind: str, temperature: float, **kw) -> mx.array:
        return sparse_divergence(
            student_logits,
            self.topk_ids,
            self.topk_logprobs,
            self.tail_logmass,
            kind,
            temperature,
            self.vocab_size,
            **kw,
        )


@dataclass(frozen=True)
class SampledTeacher:
    """The teacher's log-prob of each next token only, log p(x) [B, L], with those tokens [B, L]: what on-policy
    distillation's `sampled` estimator needs (on_policy.py), on tokens the student itself sampled.

    Its divergence is the per-token reverse-KL estimate r = log q(x) − log p(x) at T = 1, as a loss whose value
    is r and whose gradient is r · ∇ log q(x), the policy gradient of E_q[log q − log p] with each token's own
    r as its (negated) reward (the expectation of ∇ log q alone is 0). Only `reverse_kl` has this estimator.
    """

    token_logprobs: mx.array
    tokens: mx.array

    @classmethod
    def from_logits(cls, teacher_logits: mx.array, next_tokens: mx.array) -> SampledTeacher:
        log_p = log_softmax_t(teacher_logits.astype(mx.float32))
        ids = next_tokens.astype(mx.int32)[..., None]
        return cls(mx.stop_gradient(mx.take_along_axis(log_p, ids, axis=-1)[..., 0]), next_tokens)

    def divergence(self, student_logits: mx.array, kind: str, temperature: float, **kw) -> mx.array:
        if kind != "reverse_kl":
            raise ValueError(f"the sampled-token estimator is of reverse_kl only, not {kind}")
        log_q_all = log_softmax_t(student_logits.astype(mx.float32))
        log_q = mx.take_along_axis(log_q_all, self.tokens.astype(mx.int32)[..., None], axis=-1)[..., 0]
        reward = mx.stop_gradient(log_q - self.token_logprobs)
        centred = log_q - mx.stop_gradient(log_q)  # value 0, gradient ∇ log q
        return reward + reward * centred


Teacher = DenseTeacher | SparseTeacher | SampledTeacher


@runtime_checkable
class TeacherWeighting(Protocol):
    """Gives each teacher's weight per instance: (teachers, student_logits [B, L, V], mask [B, L]) → [n, B].

    Each column should sum to 1. The loss treats the weights as constants (no gradient flows through them).
    """

    def __call__(self, teachers: Sequence[Teacher], student_logits: mx.array, mask: mx.array) -> mx.array: ...


class FixedWeights:
    """Fixed weights [n_teachers] (one per teacher) or [n_teachers, B] (per instance).

    Normalised over the teacher axis to sum to 1. Validated once, here: build it outside the training step.
    """

    def __init__(self, weights: Sequence[float] | np.ndarray | mx.array):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim not in (1, 2) or w.shape[0] == 0:
            raise ValueError(f"teacher weights must have shape [n_teachers] or [n_teachers, B], got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("teacher weights must be finite and >= 0")
        totals = w.sum(axis=0)
        if np.any(totals <= 0):
            raise ValueError("teacher weights must not all be zero")
        self.weights = mx.array((w / totals).astype(np.float32))

    def __call__(self, teachers: Sequence[Teacher], student_logits: mx.array, mask: mx.array) -> mx.array:
        n, batch = self.weights.shape[0], student_logits.shape[0]
        if self.weights.ndim == 1:
            return mx.broadcast_to(self.weights[:, None], (n, batch))
        if self.weights.shape[1] != batch:
            raise ValueError(f"per-instance teacher weights are for batch {self.weights.shape[1]}, got {batch}")
        return self.weights


def _teacher_weights(
    teacher_weights: TeacherWeighting | Sequence[float] | np.ndarray | mx.array | None,
    teachers: Sequence[Teacher],
    student_logits: mx.array,
    mask: mx.array,
) -> mx.array:
    """Resolve `teacher_weights` (None = equal, an array, or a TeacherWeighting) to constants [n, B].

    An mx.array [n, B] is taken as it is, already normalised: the trainer's per-batch weights (weighting.py),
    computed outside the compiled step and passed in as one of its inputs."""
    n, batch = len(teachers), student_logits.shape[0]
    if isinstance(teacher_weights, mx.array) and teacher_weights.ndim == 2:
        weights = teacher_weights
    else:
        if teacher_weights is None:
            weighting: TeacherWeighting = FixedWeights([1.0] * n)
        elif callable(teacher_weights):
            weighting = teacher_weights
        else:
            weighting = FixedWeights(teacher_weights)
        weights = weighting(teachers, student_logits, mask)
    if tuple(weights.shape) != (n, batch):
        raise ValueError(f"teacher weights have shape {tuple(weights.shape)}, expected {(n, batch)}")
    return mx.stop_gradient(weights.astype(mx.float32))


# --------------------------------------------------------------------------------------------------------
# The training loss

_LOSS_DEFAULTS = LossSpec()


def _cfg(loss_cfg: object, name: str):
    """A loss setting read by name (LossSpec, a merged override, any namespace); None → LossSpec default."""
    value = getattr(loss_cfg, name, None)
    return getattr(_LOSS_DEFAULTS, name) if value is None else value


def masked_cross_entropy_sum(student_logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """Σ over masked positions of CE = logsumexp(s) − s[target], at T = 1, in float32."""
    logits = student_logits.astype(mx.float32)
    # Targets at unmasked positions may be anything (e.g. an ignore index of -100): never index with them.
    safe_targets = mx.where(mask, targets, 0).astype(mx.int32)
    picked = mx.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    ce = fused.logsumexp_last(logits)[..., 0] - picked
    return mx.sum(mx.where(mask, ce, 0.0))


def distill_loss(
    student_logits: mx.array,
    targets: mx.array,
    mask: mx.array,
    teachers: Sequence[Teacher],
    teacher_weights: TeacherWeighting | Sequence[float] | np.ndarray | mx.array | None = None,
    loss_cfg: object = None,
) -> tuple[mx.array, mx.array]:
    """The training loss and the number of counted tokens.

        loss = α · Σ_teachers w · mean_masked(T² · D(p_teacher ‖ q_student))
             + (1 − α) · mean_masked(CE(student logits at T = 1, targets))

    student_logits [B, L, V]; targets [B, L]; mask [B, L] (nonzero = a target position that counts);
    teachers: DenseTeacher / SparseTeacher per teacher; teacher_weights: None (equal), [n] or [n, B]
    (normalised over teachers), or a TeacherWeighting; loss_cfg: anything with kind, temperature, alpha,
    beta, skew (a LossSpec or a merged override; missing/None settings take LossSpec's defaults).
    α = 0 skips the teachers entirely (plain SFT; `teachers` may be empty), α = 1 skips the CE.
    Means are over masked positions: sum / ntoks (a batch with no counted token gives loss 0).
    Differentiable w.r.t. student_logits; returns (loss, ntoks) with ntoks = number of masked positions.
    """
    kind = _cfg(loss_cfg, "kind")
    temperature = float(_cfg(loss_cfg, "temperature"))
    alpha = float(_cfg(loss_cfg, "alpha"))
    beta, skew = float(_cfg(loss_cfg, "beta")), float(_cfg(loss_cfg, "skew"))
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    counted = mask != 0
    ntoks = counted.astype(mx.int32).sum()
    denom = mx.maximum(ntoks, 1).astype(mx.float32)
    loss = mx.array(0.0, dtype=mx.float32)

    if alpha > 0.0:
        if not teachers:
            raise ValueError("alpha > 0 needs at least one teacher")
        weights = _teacher_weights(teacher_weights, teachers, student_logits, counted)
        per_position = sum(
            weights[i][:, None] * teacher.divergence(student_logits, kind, temperature, beta=beta, skew=skew)
            for i, teacher in enumerate(teachers)
        )
        loss = loss + alpha * mx.sum(mx.where(counted, per_position, 0.0)) / denom

    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * masked_cross_entropy_sum(student_logits, targets, counted) / denom

    return loss, ntoks
