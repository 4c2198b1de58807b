"""Validation metrics of a student against its teacher(s), over masked target positions.

- val_kl: forward KL(teacher ‖ student) at T = 1. Against a cached teacher it is computed on the cache's
  k + 1 buckets (top-k tokens + the tail), a lower bound on the full-vocabulary KL; against an online
  teacher it is the full KL. `kl_method` says which.
- val_js: Jensen-Shannon divergence (β = 0.5), same support as val_kl.
- val_top1_agreement: student argmax == teacher argmax; val_top5_agreement: teacher argmax within the
  student's top 5.
- student_entropy (full), teacher_entropy (full online; top-k + uniform tail offline), val_ce and val_ppl
  (the student's cross-entropy on the data's own next tokens, and its exponential).
Teacher-relative numbers are averaged over teachers with the weighting's `yardstick` weights (weighting.py:
the fixed weights, or each instance's confidence weights). With several teachers the evaluation also has
`val_kl_teachers` (the KL to each teacher alone, in the spec's order), `teacher_weights` (the mean weight the
run's own weighting gives each teacher over the split) and `teacher_weights_std` (their spread over instances).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from . import losses
from .batches import CachedTeacher, Split
from .weighting import Weighting


def _teacher_view(teacher, logits: mx.array):
    """(log_p, log_q, teacher argmax, teacher entropy per position) on the support the teacher allows."""
    if isinstance(teacher, losses.DenseTeacher):
        log_p = losses.log_softmax_t(teacher.logits)
        log_q = losses.log_softmax_t(logits)
        entropy = -(mx.exp(log_p) * log_p).sum(axis=-1)
        return log_p, log_q, mx.argmax(teacher.logits, axis=-1), entropy
    log_p = losses.teacher_buckets(teacher.topk_logprobs, teacher.tail_logmass, 1.0, teacher.vocab_size)
    log_q = losses.student_buckets(logits, teacher.topk_ids, 1.0)
    p = mx.exp(log_p)
    n_tail = max(teacher.vocab_size - teacher.topk_ids.shape[-1], 1)
    spread = mx.concatenate([mx.zeros_like(log_p[..., :-1]), mx.full(log_p[..., -1:].shape, math.log(n_tail))], -1)
    entropy = -(p * (log_p - spread)).sum(axis=-1)  # the tail's mass spread evenly over its n_tail tokens
    return log_p, log_q, teacher.topk_ids[..., 0].astype(mx.int32), entropy


def evaluate(model, split: Split, weighting: Weighting, pad_id: int, batches: list[np.ndarray]) -> dict:
    """The metrics above over `batches` (index arrays into the split, e.g. `data.eval_batches(...)`)."""
    sums = dict.fromkeys(("kl", "js", "top1", "top5", "s_ent", "t_ent", "ce"), 0.0)
    per_teacher_kl = np.zeros(len(split.teachers))
    used: list[np.ndarray] = []  # the run's own weights [n, B] of each batch's instances
    count = 0
    dense = False
    for idx in batches:
        tokens, mask, teachers = split.batch(idx, pad_id)
        logits = model(tokens[:, :-1]).astype(mx.float32)
        m = mask.astype(mx.float32)
        log_q_full = losses.log_softmax_t(logits)
        top5 = mx.argpartition(-logits, kth=4, axis=-1)[..., :5]
        step = {
            "ce": losses.masked_cross_entropy_sum(logits, tokens[:, 1:], mask),
            "s_ent": (-(mx.exp(log_q_full) * log_q_full).sum(axis=-1) * m).sum(),
        }
        w = weighting.yardstick(tokens, mask, teachers) if teachers else None  # [n, B]
        if w is not None and len(teachers) > 1:
            counted = m.sum(axis=-1) > 0
            mine = np.array(weighting.weights(tokens, mask, teachers))
            used.append(mine[:, np.array(counted)])
        for i, teacher in enumerate(teachers):
            dense = dense or isinstance(teacher, losses.DenseTeacher)
            log_p, log_q, t_top1, t_ent = _teacher_view(teacher, logits)
            per = {
                "kl": losses.divergence("forward_kl", log_p, log_q),
                "js": losses.divergence("jsd", log_p, log_q, beta=0.5),
                "top1": (mx.argmax(logits, axis=-1) == t_top1).astype(mx.float32),
                "top5": (top5 == t_top1[..., None]).any(axis=-1).astype(mx.float32),
                "t_ent": t_ent,
            }
            assert w is not None
            for name, value in per.items():
                step[name] = step.get(name, 0.0) + (w[i][:, None] * value * m).sum()
            step[f"kl_{i}"] = (per["kl"] * m).sum()
        mx.eval(step)
        for name, value in step.items():
            if name.startswith("kl_"):
                per_teacher_kl[int(name[3:])] += float(value)
            else:
                sums[name] += float(value)
        count += int(m.sum().item())
    n = max(count, 1)
    mean = {k: v / n for k, v in sums.items()}
    first = split.teachers[0] if split.teachers else None
    k = first.cache.top_k if isinstance(first, CachedTeacher) and not dense else None
    return {
        "val_kl": mean["kl"],
        "val_js": mean["js"],
        "val_ce": mean["ce"],
        "val_ppl": math.exp(min(mean["ce"], 50.0)),
        "val_top1_agreement": mean["top1"],
        "val_top5_agreement": mean["top5"],
        "student_entropy": mean["s_ent"],
        "teacher_entropy": mean["t_ent"],
        "val_tokens": count,
        "kl_method": "full" if dense else f"top{k}+tail",
        **_teacher_report(per_teacher_kl / n, used),
    }


def _teacher_report(per_teacher_kl: np.ndarray, used: list[np.ndarray]) -> dict:
    """With several teachers: the KL to each, and the weights the run gives each (mean and spread), as lists in
    the spec's order and as one number per teacher (`val_kl_teacher_0`, ...: the metrics' series are numbers)."""
    if len(per_teacher_kl) < 2:
        return {}
    lists: dict[str, list[float]] = {"val_kl_teachers": [float(x) for x in per_teacher_kl]}
    if used and (w := np.concatenate(used, axis=1)).shape[1]:
        lists["teacher_weights"] = [round(float(x), 6) for x in w.mean(axis=1)]
        lists["teacher_weights_std"] = [round(float(x), 6) for x in w.std(axis=1)]
    names = {
        "val_kl_teachers": "val_kl_teacher",
        "teacher_weights": "teacher_weight",
        "teacher_weights_std": "teacher_weight_std",
    }
    scalars = {f"{names[k]}_{i}": x for k, values in lists.items() for i, x in enumerate(values)}
    return {**lists, **scalars}


# The metrics a person reads first, in order, with their names in messages: what a run's log lines and its
# "done" message show (each only where the evaluation has it: a run on prompts alone has no val KL on data).
HEADLINE = (
    ("val_kl", "val KL", ".4f"),
    ("val_reverse_kl", "reverse KL on samples", ".4f"),
    ("val_ppl", "perplexity", ".2f"),
    ("val_top1_agreement", "top-1 agreement", ".3f"),
)


def describe(metrics: dict) -> str:
    """'val KL 0.1234, perplexity 28.90, ...' for the headline metrics an evaluation has."""
    return ", ".join(f"{label} {metrics[key]:{fmt}}" for key, label, fmt in HEADLINE if key in metrics)


def describe_change(before: dict, after: dict) -> str:
    """'val KL 0.3512 -> 0.1625, ...' for the headline metrics both evaluations have."""
    return ", ".join(
        f"{label} {before[key]:{fmt}} -> {after[key]:{fmt}}"
        for key, label, fmt in HEADLINE
        if key in before and key in after
    )
