"""How much each teacher counts on each instance: `teacher_weighting: fixed | confidence | learned`.

Every weighting gives, for a batch, constants w [n_teachers, B] whose columns sum to 1; the loss mixes the
teachers' divergences with them (losses.distill_loss) and no gradient of the student flows through them.

- fixed: the teachers' `weight`s, normalised (what the product always did).
- confidence: each teacher's own likelihood of the instance's text, from what the loss already has (the
  cache's top-k offline, the logits online): w_i ∝ prior_i · exp(mean_t log p_i(x_t | x_<t) / τ). At τ = 1 it
  weighs each teacher by the inverse of its perplexity on the instance: the specialist leads where its domain
  is, the generalist elsewhere. A reference token outside a cached teacher's top-k gets the tail's mass spread
  evenly over the tail's tokens.
- learned (after AMTML-KD, arXiv 2103.04062): an instance encoder and one latent vector per teacher; the gate's
  weights are a softmax over their dot products. The encoder reads a compact view of the instance: the
  student's input embeddings pooled over the instance (its content) and, per teacher, the mean log-prob of the
  reference tokens and of its own top token (its confidence). It costs the cache nothing: the teachers'
  features come from the top-k it already holds. The gate is trained with the student, one Adam step per
  batch, to make the weighted mixture of teachers predict the data (−mean log Σ_i w_i p_i(x_t)), plus
  `balance` · KL(prior ‖ the batch's mean weights), a barrier that keeps it from giving one teacher every
  instance. Its state (weights and Adam moments) is in every checkpoint, so a resumed run continues it exactly.

The score that picks the best checkpoint mixes the teachers with the `yardstick` weights: a weighting that
does not move while the run trains (fixed → fixed, confidence and learned → confidence), so evaluations stay
comparable as the gate learns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_unflatten

from . import losses
from .mlx_typed import flat_arrays


def reference_logprobs(teacher: losses.Teacher, targets: mx.array) -> mx.array:
    """log p_teacher(target) at T = 1 at every position [B, L] (anything where targets are padding)."""
    if isinstance(teacher, losses.SampledTeacher):
        return teacher.token_logprobs
    safe = mx.maximum(targets, 0).astype(mx.int32)
    if isinstance(teacher, losses.DenseTeacher):
        log_p = losses.log_softmax_t(teacher.logits.astype(mx.float32))
        return mx.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    match = teacher.topk_ids == safe[..., None]
    in_top = match.any(axis=-1)
    picked = mx.sum(mx.where(match, teacher.topk_logprobs.astype(mx.float32), 0.0), axis=-1)
    n_tail = max(teacher.vocab_size - teacher.topk_ids.shape[-1], 1)
    return mx.where(in_top, picked, teacher.tail_logmass.astype(mx.float32) - math.log(n_tail))


def top_logprobs(teacher: losses.Teacher) -> mx.array:
    """The log-prob of the teacher's own most likely token [B, L] (of the sampled one for a SampledTeacher)."""
    if isinstance(teacher, losses.SampledTeacher):
        return teacher.token_logprobs
    if isinstance(teacher, losses.DenseTeacher):
        return mx.max(losses.log_softmax_t(teacher.logits.astype(mx.float32)), axis=-1)
    return mx.max(teacher.topk_logprobs.astype(mx.float32), axis=-1)


def _instance_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean over each row's counted positions [B, L] -> [B] (0 for a row with none)."""
    m = mask.astype(mx.float32)
    return mx.sum(values * m, axis=-1) / mx.maximum(mx.sum(m, axis=-1), 1.0)


class Weighting:
    """Fixed weights; the base of the adaptive ones. `weights` is what training mixes with, `yardstick` what
    the score mixes with, `learn` the weighting's own update after a batch (nothing here)."""

    name = "fixed"

    def __init__(self, prior: Sequence[float]):
        p = np.asarray(prior, dtype=np.float64)
        if p.ndim != 1 or len(p) == 0 or not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise ValueError(f"teacher weights must be finite and > 0, got {list(prior)}")
        self.prior = (p / p.sum()).astype(np.float32)
        self.log_prior = mx.array(np.log(self.prior))[:, None]  # [n, 1]

    @property
    def n(self) -> int:
        return len(self.prior)

    def weights(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        return mx.broadcast_to(mx.exp(self.log_prior), (self.n, tokens.shape[0]))

    def yardstick(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        return self.weights(tokens, mask, teachers)

    def learn(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> None:
        """Nothing to learn."""

    def state(self) -> dict[str, mx.array]:
        """What a checkpoint keeps of the weighting (arrays by name); fixed and confidence keep nothing."""
        return {}

    def load_state(self, arrays: dict[str, mx.array]) -> None:
        """Back to a `state()`."""


class ConfidenceWeights(Weighting):
    name = "confidence"

    def __init__(self, prior: Sequence[float], temperature: float = 1.0):
        super().__init__(prior)
        self.temperature = float(temperature)

    def weights(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        targets, counted = tokens[:, 1:], mask != 0
        mean_lp = mx.stack([_instance_mean(reference_logprobs(t, targets), counted) for t in teachers])  # [n, B]
        return mx.stop_gradient(mx.softmax(self.log_prior + mean_lp / self.temperature, axis=0))


class TeacherGate(nn.Module):
    """The instance encoder (a two-layer MLP) and the teachers' latent vectors: logits [B, n]."""

    def __init__(self, in_dims: int, n_teachers: int, hidden: int = 64, seed: int = 0):
        super().__init__()
        k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)  # its own key: the run's random state is untouched
        self.w1 = mx.random.normal((in_dims, hidden), key=k1) / math.sqrt(in_dims)
        self.b1 = mx.zeros((hidden,))
        self.w2 = mx.random.normal((hidden, hidden), key=k2) / math.sqrt(hidden)
        self.b2 = mx.zeros((hidden,))
        self.teachers = 0.01 * mx.random.normal((n_teachers, hidden), key=k3)  # small: near the prior at first

    def __call__(self, features: mx.array) -> mx.array:
        h = nn.gelu(features @ self.w1 + self.b1) @ self.w2 + self.b2
        return h @ self.teachers.T / math.sqrt(self.teachers.shape[-1])


class LearnedWeights(Weighting):
    name = "learned"

    def __init__(
        self,
        prior: Sequence[float],
        embed: Callable[[mx.array], mx.array] | None,
        embed_dims: int,
        *,
        learning_rate: float = 1e-3,
        balance: float = 0.1,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        """`embed`: the student's token embedding (tokens [B, L] -> [B, L, embed_dims]), or None to read the
        teachers' confidence alone."""
        super().__init__(prior)
        self.embed, self.embed_dims = embed, embed_dims if embed is not None else 0
        self.balance = float(balance)
        self.confidence = ConfidenceWeights(prior, temperature)
        self.gate = TeacherGate(self.embed_dims + 2 * self.n, self.n, seed=seed)
        self.learning_rate = float(learning_rate)
        self.optimizer = optim.Adam(learning_rate=self.learning_rate)
        self._gate_grad = nn.value_and_grad(self.gate, self._gate_loss)

    def _features(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        targets, counted = tokens[:, 1:], mask != 0
        parts = []
        if self.embed is not None:
            pooled = _instance_mean(mx.moveaxis(self.embed(tokens[:, :-1]).astype(mx.float32), -1, 0), counted)
            pooled = pooled.T  # [B, d]
            mu, sd = mx.mean(pooled, axis=-1, keepdims=True), mx.std(pooled, axis=-1, keepdims=True)
            parts.append((pooled - mu) / (sd + 1e-6))
        for t in teachers:  # log-probs scaled to about unit size
            parts.append(_instance_mean(mx.maximum(reference_logprobs(t, targets), -30.0), counted)[:, None] / 5)
            parts.append(_instance_mean(top_logprobs(t), counted)[:, None] / 5)
        return mx.stop_gradient(mx.concatenate(parts, axis=-1))

    def _log_weights(self, gate: TeacherGate, features: mx.array) -> mx.array:
        """log w [n, B]."""
        logits = gate(features).T + self.log_prior
        return logits - mx.logsumexp(logits, axis=0, keepdims=True)

    def weights(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        return mx.stop_gradient(mx.exp(self._log_weights(self.gate, self._features(tokens, mask, teachers))))

    def yardstick(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> mx.array:
        return self.confidence.weights(tokens, mask, teachers)

    def _gate_loss(self, gate, features: mx.array, ref_lp: mx.array, counted: mx.array) -> mx.array:
        log_w = self._log_weights(gate, features)  # [n, B]
        mixture = mx.logsumexp(log_w[:, :, None] + ref_lp, axis=0)  # [B, L]: log Σ_i w_i p_i(x_t)
        m = counted.astype(mx.float32)
        nll = -mx.sum(mixture * m) / mx.maximum(mx.sum(m), 1.0)
        mean_w = mx.mean(mx.exp(log_w), axis=1)
        prior = mx.exp(self.log_prior[:, 0])
        barrier = mx.sum(prior * (mx.log(prior) - mx.log(mean_w + 1e-9)))  # KL(prior ‖ mean weights)
        return nll + self.balance * barrier

    def learn(self, tokens: mx.array, mask: mx.array, teachers: Sequence[losses.Teacher]) -> None:
        targets, counted = tokens[:, 1:], mask != 0
        if not bool(counted.any().item()):
            return
        features = self._features(tokens, mask, teachers)
        ref_lp = mx.stop_gradient(mx.stack([mx.maximum(reference_logprobs(t, targets), -30.0) for t in teachers]))
        _, grads = self._gate_grad(self.gate, features, ref_lp, counted)
        self.optimizer.update(self.gate, grads)
        mx.eval(self.gate.parameters(), self.optimizer.state)

    def state(self) -> dict[str, mx.array]:
        gate = {f"gate.{k}": v for k, v in flat_arrays(self.gate.parameters())}
        adam = {f"adam.{k}": v for k, v in flat_arrays(self.optimizer.state)}
        return {**gate, **adam}

    def load_state(self, arrays: dict[str, mx.array]) -> None:
        gate = [(k.removeprefix("gate."), v) for k, v in arrays.items() if k.startswith("gate.")]
        adam = [(k.removeprefix("adam."), v) for k, v in arrays.items() if k.startswith("adam.")]
        self.gate.update(tree_unflatten(gate))
        self.optimizer = optim.Adam(learning_rate=self.learning_rate)
        if adam:
            self.optimizer.state = tree_unflatten(adam)
        mx.eval(self.gate.parameters(), self.optimizer.state)


def make(kind: str, prior: Sequence[float], model=None, options=None, seed: int = 0) -> Weighting:
    """The spec's `teacher_weighting` (with its `weighting` options) over teachers of weights `prior`."""
    temperature = float(getattr(options, "temperature", 1.0))
    if kind == "fixed":
        return Weighting(prior)
    if kind == "confidence":
        return ConfidenceWeights(prior, temperature)
    if kind == "learned":
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        dims = int(embed(mx.array([[0]])).shape[-1]) if embed is not None else 0
        return LearnedWeights(
            prior,
            (lambda t: mx.stop_gradient(embed(t))) if embed is not None else None,
            dims,
            learning_rate=float(getattr(options, "learning_rate", 1e-3)),
            balance=float(getattr(options, "balance", 0.1)),
            temperature=temperature,
            seed=seed,
        )
    raise ValueError(f"teacher_weighting: unknown kind {kind!r} (fixed, confidence, learned)")
