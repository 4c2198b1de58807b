"""The benchmark's numbers: per-batch text sums against the reference's distribution, sequence
log-likelihoods, multiple-choice and preference accuracy, generation speed. Pure functions of arrays (and, for
`sequence_logprobs` / `measure_speed`, a loaded model); benchmark.py decides what runs when.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from numpy.typing import ArrayLike

from . import data as data_mod
from . import losses

# ------------------------------------------------------------------------------------------------ text


def reference_view(ref_logits: mx.array) -> tuple[mx.array, mx.array]:
    """(log p in float32, argmax) of the reference's logits [..., V]: what `text_sums` compares a model with."""
    return losses.log_softmax_t(ref_logits), mx.argmax(ref_logits, axis=-1)


def forward_kl(log_p: mx.array, log_q: mx.array, p: mx.array | None = None) -> mx.array:
    """KL(p‖q) = Σ p (log p − log q) over the last axis, 0 where p is 0; `p` = exp(log_p) if already computed."""
    p = mx.exp(log_p) if p is None else p
    return mx.where(p > 0, p * (log_p - log_q), 0.0).sum(axis=-1)


def js_divergence(log_p: mx.array, log_q: mx.array, p: mx.array | None = None, q: mx.array | None = None) -> mx.array:
    """JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2, over the last axis; `p`, `q` = exp(log_p), exp(log_q)
    if already computed.

    Each position's term is taken as exactly 0 where log p == log q, so a model compared with itself scores
    exactly 0, and where m is 0 (both probabilities below float32's range), where both terms are 0.
    """
    p = mx.exp(log_p) if p is None else p
    q = mx.exp(log_q) if q is None else q
    mid = 0.5 * (p + q)
    log_m = mx.log(mid)
    terms = 0.5 * (p * (log_p - log_m) + q * (log_q - log_m))
    return mx.where((log_p != log_q) & (mid > 0), terms, 0.0).sum(axis=-1)


def text_sums(ref: tuple[mx.array, mx.array], logits: mx.array, targets: mx.array, mask: mx.array) -> dict:
    """Sums over the masked positions of ce, kl, js, top1, top5, and their count `tokens`.

    ref: `reference_view` of the reference at the same positions; logits [..., V]; targets, mask [...]
    (a batch [B, L] or the batch's target positions [N]). Every full-vocabulary array is computed once and
    shared: log q (whose normaliser the cross-entropy reuses), p = exp(log p) and q = exp(log q) (KL and JS).
    """
    log_p, ref_top = ref
    logits = logits.astype(mx.float32)
    log_q = losses.log_softmax_t(logits)
    p, q = mx.exp(log_p), mx.exp(log_q)
    at_ref_top = mx.take_along_axis(logits, ref_top[..., None], axis=-1)
    rank = (logits > at_ref_top).sum(axis=-1)  # logits strictly above the one at the reference's argmax
    per_position = {
        "kl": forward_kl(log_p, log_q, p),
        "js": js_divergence(log_p, log_q, p, q),
        "top1": (mx.argmax(logits, axis=-1) == ref_top).astype(mx.float32),
        "top5": (rank < 5).astype(mx.float32),
        "ce": _cross_entropy(log_q, targets, mask),
    }
    return _masked_sums(per_position, mask)


def self_sums(log_q: mx.array, targets: mx.array, mask: mx.array) -> dict:
    """`text_sums(reference_view(logits), logits, ...)` from log_q = reference_view(logits)[0], without the
    full-vocabulary work whose answer is known: kl = js = 0 and top1 = top5 = 1 at every position (the same
    numbers, exactly)."""
    zeros, ones = mx.zeros(targets.shape), mx.ones(targets.shape)
    per_position = {"kl": zeros, "js": zeros, "top1": ones, "top5": ones, "ce": _cross_entropy(log_q, targets, mask)}
    return _masked_sums(per_position, mask)


def _cross_entropy(log_q: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """−log q(target) per position; 0 where the mask is 0 (the targets there may be anything)."""
    safe_targets = mx.where(mask != 0, targets, 0).astype(mx.int32)
    return mx.where(mask != 0, -mx.take_along_axis(log_q, safe_targets[..., None], axis=-1)[..., 0], 0.0)


def _masked_sums(per_position: dict[str, mx.array], mask: mx.array) -> dict:
    m = mask.astype(mx.float32)
    sums = {k: (v * m).sum() for k, v in per_position.items()}
    sums["tokens"] = m.sum()
    return sums


def text_metrics(sums: dict[str, float]) -> dict:
    """Means per target token from accumulated `text_sums`; ppl = exp(ce)."""
    n = max(sums["tokens"], 1.0)
    ce = sums["ce"] / n
    return {
        "ppl": math.exp(min(ce, 50.0)),
        "ce": ce,
        "kl": sums["kl"] / n,
        "js": sums["js"] / n,
        "top1_agreement": sums["top1"] / n,
        "top5_agreement": sums["top5"] / n,
        "tokens": int(sums["tokens"]),
    }


# ------------------------------------------------------------------------------------- log-likelihoods


def sequence_logprobs(model, tokens: mx.array, target_mask: mx.array) -> tuple[mx.array, mx.array]:
    """(Σ log p(token) over each row's target positions, number of targets) for tokens [B, L].

    target_mask [B, L] is aligned with `tokens` like `data.Example.target_mask` (True: a scored token).
    """
    logits = model(tokens[:, :-1])
    log_q = losses.log_softmax_t(logits)
    picked = mx.take_along_axis(log_q, tokens[:, 1:, None].astype(mx.int32), axis=-1)[..., 0]
    m = target_mask[:, 1:]
    return mx.where(m, picked, 0.0).sum(axis=-1), m.astype(mx.int32).sum(axis=-1)


def continuation_examples(tokenizer, pairs: list[tuple[str, str]], max_seq_len: int) -> list[data_mod.Example]:
    """prompt + continuation with the continuation's tokens as targets, at most the last `max_seq_len` tokens.

    Encoded in two parts (the prompt with the tokenizer's special tokens, the continuation without), as
    `completions` data is, so the boundary is exact in tokens.
    """
    examples = []
    for i, (prompt, continuation) in enumerate(pairs):
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(continuation, add_special_tokens=False)
        tokens = np.array(p + c, dtype=np.int32)[-max_seq_len:]
        mask = np.array([False] * len(p) + [True] * len(c))[-max_seq_len:]
        mask[0] = False
        examples.append(data_mod.Example(tokens, mask, i))
    return examples


def per_token(loglik: ArrayLike, n_tokens: ArrayLike) -> np.ndarray:
    """Length-normalised scores: summed log-likelihood / token count (a count of 0 is taken as 1)."""
    return np.asarray(loglik, dtype=np.float64) / np.maximum(np.asarray(n_tokens), 1)


def by_subject(subjects: list[str | None], **per_example: np.ndarray) -> dict[str, dict] | None:
    """{subject: {name: mean of that array over the subject's examples, ..., "n": count}}; None without subjects.

    Examples without a subject count in the overall figures only.
    """
    named = sorted({s for s in subjects if s is not None})
    if not named:
        return None
    labels = np.array(subjects, dtype=object)
    out = {}
    for subject in named:
        pick = labels == subject
        out[subject] = {**{k: float(np.asarray(v)[pick].mean()) for k, v in per_example.items()}, "n": int(pick.sum())}
    return out


def mcq_metrics(
    scores: list[list[float]], n_tokens: list[list[int]], answers: list[int], subjects: list[str | None]
) -> dict:
    """Accuracy (argmax of summed log-likelihood), length-normalised accuracy, and both per subject."""
    right = np.array([int(np.argmax(s)) == a for s, a in zip(scores, answers)], dtype=np.float64)
    right_norm = np.array(
        [int(np.argmax(per_token(s, n))) == a for s, n, a in zip(scores, n_tokens, answers)], dtype=np.float64
    )
    out: dict[str, Any] = {
        "mcq_accuracy": float(right.mean()),
        "mcq_accuracy_norm": float(right_norm.mean()),
        "mcq_n": len(answers),
    }
    subject_table = by_subject(subjects, accuracy=right, accuracy_norm=right_norm)
    if subject_table:
        out["mcq_by_subject"] = subject_table
    return out


@dataclass(frozen=True)
class PairScores:
    """One model's scores of preference pairs: summed log-likelihood and token count of each response."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray

    @classmethod
    def from_examples(cls, loglik: np.ndarray, n_tokens: np.ndarray) -> PairScores:
        """From per-example arrays laid out chosen, rejected, chosen, rejected, ... (as benchmark_data.py's
        `pref_examples` makes them)."""
        return cls(loglik[0::2], loglik[1::2], n_tokens[0::2], n_tokens[1::2])

    def margin(self, normalised: bool) -> np.ndarray:
        """score(chosen) − score(rejected): summed log-likelihoods, or means per response token."""
        if normalised:
            return per_token(self.chosen, self.chosen_tokens) - per_token(self.rejected, self.rejected_tokens)
        return np.asarray(self.chosen, dtype=np.float64) - np.asarray(self.rejected, dtype=np.float64)


def pair_credit(margin: np.ndarray) -> np.ndarray:
    """1 where chosen scores higher, 0 where rejected does, ½ for a tie (equal scores: a coin flip's worth)."""
    return (1.0 + np.sign(margin)) / 2.0


def pair_agreement(margin: np.ndarray, ref_margin: np.ndarray) -> np.ndarray:
    """1 where the model orders the pair as the reference does (both ties included), 0 where it orders it the
    other way, ½ where exactly one of the two ties."""
    return 1.0 - np.abs(np.sign(margin) - np.sign(ref_margin)) / 2.0


def pref_metrics(model: PairScores, reference: PairScores, subjects: list[str | None] | None = None) -> dict:
    """Preference accuracy and agreement with the reference's ranking, each from summed log-likelihoods and
    from per-token means (`_norm`); tie counts; and, when pairs have subjects, all four per subject."""
    per_pair: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {}
    for suffix, normalised in (("", False), ("_norm", True)):
        mine, theirs = model.margin(normalised), reference.margin(normalised)
        per_pair["accuracy" + suffix] = pair_credit(mine)
        per_pair["agreement" + suffix] = pair_agreement(mine, theirs)
        out["pref_ties" + suffix] = int((mine == 0).sum())
    for name, values in per_pair.items():
        out["pref_" + name] = float(values.mean())
    out["pref_n"] = len(model.chosen)
    subject_table = by_subject(subjects or [None] * len(model.chosen), **per_pair)
    if subject_table:
        out["pref_by_subject"] = subject_table
        harmless = next((v for k, v in subject_table.items() if k.lower() == "harmless"), None)
        if harmless is not None:  # harmlessness: the preference accuracy on the `harmless` subject's pairs
            out["pref_harmless_accuracy"] = harmless["accuracy"]
            out["pref_harmless_accuracy_norm"] = harmless["accuracy_norm"]
    return out


# ----------------------------------------------------------------------------------------------- speed


def speed_runs(repeats: int) -> int:
    """How many runs `measure_speed` makes: a warm-up, then `repeats`."""
    return 1 + repeats


def measure_speed(
    model, tokenizer, prompt_tokens: int, decode_tokens: int, repeats: int = 1, on_run: Callable[[], None] | None = None
) -> dict:
    """Prefill / decode tokens per second (medians over `repeats`, after a warm-up) and MLX's peak memory.

    The prompt is `prompt_tokens` fixed pseudo-random token ids; end-of-sequence tokens are suppressed so
    every run decodes exactly `decode_tokens` tokens. `on_run()` is called after the warm-up and after each
    measured run (`speed_runs(repeats)` calls in all): the benchmark's progress counts them (and may stop it).
    """
    on_run = on_run or (lambda: None)
    from mlx_lm.generate import stream_generate

    vocab = len(tokenizer.get_vocab())
    prompt = mx.array(np.random.default_rng(0).integers(0, vocab, prompt_tokens), dtype=mx.int32)
    eos = mx.array(sorted(tokenizer.eos_token_ids or []), dtype=mx.int32)[None]

    def no_eos(_tokens, logits):
        return mx.put_along_axis(logits, eos, mx.array(-mx.inf, logits.dtype), axis=-1) if eos.size else logits

    def once(n: int):
        # run the generator to its end; its last response carries the timings
        responses = deque(stream_generate(model, tokenizer, prompt, max_tokens=n, logits_processors=[no_eos]), maxlen=1)
        return responses[0] if responses else None

    once(min(decode_tokens, 2))  # warm-up: first-call allocations and kernel setup
    on_run()
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    runs = []
    for _ in range(repeats):
        runs.append(once(decode_tokens))
        on_run()
    return {
        "prefill_tokens_per_second": statistics.median(r.prompt_tps for r in runs),
        "decode_tokens_per_second": statistics.median(r.generation_tps for r in runs),
        "peak_memory_bytes": int(mx.get_peak_memory()),
        "speed_prompt_tokens": prompt_tokens,
        "speed_decode_tokens": runs[-1].generation_tokens,
    }
