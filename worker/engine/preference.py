"""Preference-aware distillation: keep the teachers' ranking of chosen over rejected (`data.preference`,
`loss.preference`).

Token-level distillation on ordinary text says nothing about which of two answers a teacher prefers, and a
student can drift there (an aligned teacher's harmlessness lives in such rankings). With a preference dataset
(`{"prompt", "chosen", "rejected", "subject"?}`) each pair is scored by the length-normalised margin

    m(x) = mean_t log p(chosen_t | prompt, chosen_<t) − mean_t log p(rejected_t | prompt, rejected_<t)

(the prompt and response joined as the benchmark joins them). The teachers' margin m_T is computed once before
training (their weighted mean, with the teachers' `weight`s); each training step adds the loss on a batch of
pairs, weighted by `loss.preference.weight`, to the token-level loss's gradients:

- bradley_terry: the cross-entropy between the preference probabilities σ(m_S / τ) and σ(m_T / τ) (the
  Bradley-Terry model of both): its minimum is m_S = m_T, and a pair the teacher ranks clearly pulls harder
  toward the right order than toward the exact margin;
- mse: (m_S − m_T)².

Every tenth pair (at least one) is held out; evaluations add, on those pairs, `val_pref_accuracy` (the student
ranks chosen first), `val_pref_agreement` (it ranks the pair as the teachers do), `val_pref_margin_gap`
(mean |m_S − m_T|) and, when pairs carry subjects, `val_harmless_accuracy` on the `harmless` subject.
Pairs are drawn from (seed, step), so a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import data as data_mod
from .benchmark_metrics import continuation_examples, pair_agreement, pair_credit
from .errors import UserError

HARMLESS = "harmless"


@dataclass
class Pairs:
    """Preference pairs as examples laid out chosen, rejected, chosen, ... with each pair's subject."""

    examples: list[data_mod.Example]
    subjects: list[str | None]

    def __len__(self) -> int:
        return len(self.subjects)

    def take(self, pair_ids: np.ndarray) -> Pairs:
        rows = [self.examples[2 * i + k] for i in pair_ids for k in (0, 1)]
        return Pairs(rows, [self.subjects[i] for i in pair_ids])


def load_pairs(path: Path, tokenizer, max_seq_len: int) -> tuple[Pairs, Pairs]:
    """(train pairs, held-out pairs) of a `preference` dataset: every tenth pair held out, at least one."""
    ds = data_mod.load_jsonl(path)
    if ds.format != "preference":
        raise UserError(f"data.preference: {path.name} is '{ds.format}' data, expected preference")
    if len(ds.records) < 2:
        raise UserError(f"data.preference: {path.name} has {len(ds.records)} pair(s); it needs at least 2")
    texts = [(r["prompt"], r[k]) for r in ds.records for k in ("chosen", "rejected")]
    examples = continuation_examples(tokenizer, texts, max_seq_len)
    for i, e in enumerate(examples):
        if not e.target_mask.any():
            record = ds.records[i // 2]
            side = ("chosen", "rejected")[i % 2]
            raise UserError(
                f"data.preference: {path.name} line {ds.lines[i // 2]}: the {side} response has no tokens left "
                f"within training.max_seq_len {max_seq_len} (prompt {len(record['prompt'])} characters)"
            )
    pairs = Pairs(examples, [r.get("subject") for r in ds.records])
    held = np.arange(0, len(pairs), 10)
    kept = np.setdiff1d(np.arange(len(pairs)), held)
    return pairs.take(kept), pairs.take(held)


def _batch(pairs: Pairs, pad_id: int) -> tuple[mx.array, mx.array]:
    toks, tmask = data_mod.collate(pairs.examples, pad_id)
    return mx.array(toks), mx.array(tmask[:, 1:])


def pair_margins(model, tokens: mx.array, mask: mx.array) -> mx.array:
    """Length-normalised margins [P] of a batch laid out chosen, rejected, ...: differentiable in the model."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    targets = tokens[:, 1:].astype(mx.int32)
    log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(log_p, mx.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    m = mask.astype(mx.float32)
    mean = mx.sum(picked * m, axis=-1) / mx.maximum(mx.sum(m, axis=-1), 1.0)
    return mean[0::2] - mean[1::2]


def margins(model, pairs: Pairs, pad_id: int, batch_pairs: int = 4) -> np.ndarray:
    """The margins of every pair under `model`, no gradient."""
    out = []
    for start in range(0, len(pairs), batch_pairs):
        tokens, mask = _batch(pairs.take(np.arange(start, min(start + batch_pairs, len(pairs)))), pad_id)
        m = pair_margins(model, tokens, mask)
        mx.eval(m)
        out.append(np.array(m, dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0)


def margin_loss(student: mx.array, teacher: mx.array, kind: str, temperature: float = 1.0) -> mx.array:
    """Mean over pairs of the loss above."""
    if kind == "mse":
        return mx.mean((student - teacher) ** 2)
    if kind == "bradley_terry":
        s, target = student / temperature, mx.sigmoid(teacher / temperature)
        return mx.mean(nn.softplus(s) - target * s)  # BCE(σ(s), target) without log σ's underflow
    raise ValueError(f"loss.preference.kind: {kind!r} is not bradley_terry or mse")


def metrics(student: np.ndarray, teacher: np.ndarray, subjects: list[str | None]) -> dict:
    """The evaluation's preference metrics (names above)."""
    out = {
        "val_pref_accuracy": float(pair_credit(student).mean()),
        "val_pref_agreement": float(pair_agreement(student, teacher).mean()),
        "val_pref_margin_gap": float(np.abs(student - teacher).mean()),
    }
    harmless = np.array([(s or "").lower() == HARMLESS for s in subjects])
    if harmless.any():
        out["val_harmless_accuracy"] = float(pair_credit(student[harmless]).mean())
    return out


class PreferenceTerm:
    """The preference part of a run: its pairs, the teachers' margins, the loss on a batch of pairs."""

    def __init__(
        self,
        train: Pairs,
        valid: Pairs,
        teacher_train: np.ndarray,
        teacher_valid: np.ndarray,
        *,
        kind: str,
        weight: float,
        batch_pairs: int,
        temperature: float,
        seed: int,
        pad_id: int,
    ):
        self.train, self.valid = train, valid
        self.teacher_train, self.teacher_valid = teacher_train.astype(np.float32), teacher_valid
        self.kind, self.weight, self.batch_pairs = kind, float(weight), min(batch_pairs, len(train))
        self.temperature, self.seed, self.pad_id = float(temperature), seed, pad_id

    def pairs_at(self, step: int) -> np.ndarray:
        """The pair ids of a step: consecutive windows of a permutation drawn per pass from (seed, pass)."""
        per_pass = max(len(self.train) // self.batch_pairs, 1)
        order = np.random.default_rng([self.seed, 7, step // per_pass]).permutation(len(self.train))
        start = (step % per_pass) * self.batch_pairs
        return order[start : start + self.batch_pairs]

    def gradients(self, model, step: int) -> tuple[float, dict]:
        """(the weighted loss, its gradients) on the step's pairs."""
        ids = self.pairs_at(step)
        tokens, mask = _batch(self.train.take(ids), self.pad_id)
        target = mx.array(self.teacher_train[ids])

        def loss_fn(m):
            return self.weight * margin_loss(pair_margins(m, tokens, mask), target, self.kind, self.temperature)

        value, grads = nn.value_and_grad(model, loss_fn)(model)
        mx.eval(value, grads)
        return float(value.item()), grads

    def evaluate(self, model) -> dict:
        return metrics(margins(model, self.valid, self.pad_id), self.teacher_valid, self.valid.subjects)


def teacher_margins(models_and_weights: list[tuple[object, float]], pairs: Pairs, pad_id: int) -> np.ndarray:
    """The teachers' margins, weighted by their (normalised) weights."""
    total = sum(w for _, w in models_and_weights)
    return sum((w / total) * margins(m, pairs, pad_id) for m, w in models_and_weights)  # type: ignore[return-value]
