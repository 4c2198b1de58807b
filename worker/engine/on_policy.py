"""On-policy distillation: the student writes completions for the data's prompts, the teacher grades each token.

Per training batch (GKD, Agarwal et al. 2024; MiniLLM, Gu et al. 2024): with probability `fraction` (GKD's λ)
the student samples a completion for each prompt of the batch (mlx-lm's batched generation, at the spec's
temperature / top-p, up to `max_new_tokens` and `max_seq_len`), the teachers run over prompt + completion,
and the loss (`loss.kind`, reverse_kl for KL(student ‖ teacher), jsd with `beta` for GKD's generalised JSD)
is taken on the sampled tokens only. The other batches are the dataset's own completions, scored the same
way (off-policy). Each sample is drawn from MLX's random key, which the trainer reseeds from (seed, step)
before each step: a re-run or a resumed run draws the same samples.

Two estimators of the loss at a sampled position:
- `full`: the divergence over the whole vocabulary (the teacher's logits at the position), the gradient taken
  through the student's distribution there, the samples themselves held fixed (as GKD does);
- `sampled`: only the teacher's log-prob of the sampled token, log p(x): the per-token reverse KL estimate
  log q(x) − log p(x) as a (negated) reward, its policy gradient (log q(x) − log p(x)) ∇ log q(x)
  (`losses.SampledTeacher`).

`reverse_kl_on_samples` is the evaluation this mode optimises: the student samples completions for held-out
prompts (a fixed key, so evaluations of one run compare), and the full-vocabulary KL(q ‖ p) at T = 1 over
those tokens, averaged over teachers with the run's weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from distillery_contract.records import PROMPT_FORMATS
from distillery_contract.specs import OnPolicySpec

from . import cancel, losses
from . import data as data_mod
from .batches import OnlineTeacher, Split
from .errors import UserError

EVAL_SEED = 0x5EED  # the key of every evaluation's samples (runs and evaluations compare on the same draws)


def prompt_of(example: data_mod.Example) -> np.ndarray:
    """The tokens before the example's first target: its prompt (chat: everything before the first reply)."""
    targets = np.flatnonzero(example.target_mask)
    return example.tokens[: int(targets[0])] if len(targets) else example.tokens


def check_prompts(examples: Sequence[data_mod.Example], fmt: str, name: str) -> None:
    """Every example must have a prompt to sample from: completions or chat data, not plain text."""
    if fmt not in PROMPT_FORMATS:
        raise UserError(
            f"data: {name} is '{fmt}' data; teacher_mode: on_policy samples completions for prompts, so it "
            'needs completions ({"prompt", "completion"}), chat or prompts ({"prompt"}) data'
        )
    empty = sum(1 for e in examples if len(prompt_of(e)) == 0)
    if empty == len(examples):
        raise UserError(f"data: {name} has no example with a non-empty prompt to sample from")


@dataclass
class Samples:
    """Completions the student wrote: one example per prompt (prompt + completion, the completion the targets)."""

    examples: list[data_mod.Example]
    generated_tokens: int
    seconds: float


def sample(model: nn.Module, tokenizer, prompts: list[np.ndarray], cfg: OnPolicySpec, max_seq_len: int) -> Samples:
    """The student's completion of each prompt (mlx-lm's BatchGenerator): at most `max_new_tokens` and never
    past `max_seq_len` in all; a completion that ends on an end-of-sequence token keeps it (the student learns
    where to stop)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout while writing
    budgets = [max(min(cfg.max_new_tokens, max_seq_len - len(p)), 1) for p in prompts]
    keep = [p[: max_seq_len - b] for p, b in zip(prompts, budgets)]
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in eos],
        sampler=make_sampler(temp=cfg.temperature, top_p=cfg.top_p),
        completion_batch_size=max(len(prompts), 1),
        prefill_batch_size=max(len(prompts), 1),
    )
    try:
        uids = gen.insert([p.tolist() for p in keep], budgets)
        out: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
    finally:
        gen.close()
        model.train(was_training)
    examples, generated = [], 0
    for i, (p, u) in enumerate(zip(keep, uids)):
        completion = np.array(out[u], dtype=np.int32)
        generated += len(completion)
        tokens = np.concatenate([p.astype(np.int32), completion])
        mask = np.zeros(len(tokens), dtype=bool)
        mask[len(p) :] = True
        examples.append(data_mod.Example(tokens=tokens, target_mask=mask, source=i))
    return Samples(examples, generated, time.perf_counter() - t0)


@dataclass
class OnPolicySplit(Split):
    """A training split whose batches are (with probability `cfg.fraction`) the student's own completions of
    the examples' prompts, scored by the online teachers. Same `batch` interface as `Split`."""

    student: nn.Module | None = None
    tokenizer: object = None
    cfg: OnPolicySpec = field(default_factory=OnPolicySpec)
    max_seq_len: int = 512
    estimator: str = "full"
    # the last batch's cost, read by the trainer after each micro-batch
    last: dict = field(default_factory=dict)

    def batch(self, example_ids: np.ndarray, pad_id: int, with_teachers: bool = True):
        cancel.point("a batch")
        on_policy = self.cfg.fraction >= 1.0 or float(np.array(mx.random.uniform())) < self.cfg.fraction
        if on_policy:
            assert self.student is not None
            drawn = sample(
                self.student,
                self.tokenizer,
                [prompt_of(self.examples[i]) for i in example_ids],
                self.cfg,
                self.max_seq_len,
            )
            examples, generated, gen_s = drawn.examples, drawn.generated_tokens, drawn.seconds
        else:
            examples, generated, gen_s = [self.examples[i] for i in example_ids], 0, 0.0
        toks, tmask = data_mod.collate(examples, pad_id, pad_to=32)  # few shapes: the compiled step retraces less
        tokens, mask = mx.array(toks), mx.array(tmask[:, 1:])
        t0 = time.perf_counter()
        teachers = [self._score(t, tokens) for t in self.teachers] if with_teachers else []
        self.last = {
            "on_policy": on_policy,
            "generated_tokens": generated,
            "teacher_tokens": int(sum(len(e.tokens) for e in examples)) * len(self.teachers) if with_teachers else 0,
            "generate_seconds": gen_s,
            "score_seconds": time.perf_counter() - t0,
        }
        return tokens, mask, teachers

    def _score(self, teacher, tokens: mx.array):
        dense = teacher.for_batch(np.arange(tokens.shape[0]), tokens)
        if self.estimator != "sampled":
            return dense
        return losses.SampledTeacher.from_logits(dense.logits, tokens[:, 1:])


@dataclass
class SampleView:
    prompt: str
    completion: str
    tokens: int
    mean_gap: float  # mean over the completion of KL(q ‖ p) at each token (nats)
    max_gap: float


def reverse_kl_on_samples(
    model: nn.Module,
    tokenizer,
    teachers: Sequence[OnlineTeacher],
    weights: np.ndarray,
    prompts: list[np.ndarray],
    cfg: OnPolicySpec,
    max_seq_len: int,
    batch_size: int,
    pad_id: int,
    show: int = 0,
) -> tuple[dict, list[SampleView]]:
    """KL(student ‖ teacher) over the vocabulary at each token the student samples for `prompts`, averaged over
    those tokens (and over teachers with `weights`); with the first `show` samples as text."""
    state = mx.random.state[0]  # type: ignore[index]  # evaluation must not move training's random stream
    mx.random.seed(EVAL_SEED)
    total, count = 0.0, 0
    shown: list[SampleView] = []
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    try:
        for start in range(0, len(prompts), batch_size):
            cancel.point("an evaluation")
            drawn = sample(model, tokenizer, prompts[start : start + batch_size], cfg, max_seq_len)
            toks, tmask = data_mod.collate(drawn.examples, pad_id, pad_to=32)
            tokens, mask = mx.array(toks), mx.array(tmask[:, 1:])
            log_q = losses.log_softmax_t(model(tokens[:, :-1]).astype(mx.float32))
            per_position = mx.zeros(mask.shape)
            for wi, teacher in zip(w, teachers):
                log_p = losses.log_softmax_t(teacher.for_batch(np.arange(tokens.shape[0]), tokens).logits)
                per_position = per_position + float(wi) * losses.divergence("reverse_kl", log_p, log_q)
            m = mask.astype(mx.float32)
            mx.eval(per_position, m)
            total += float(np.array((per_position * m).sum()))
            count += int(np.array(m.sum()))
            gaps = np.array(per_position)
            for row, e in enumerate(drawn.examples):
                if len(shown) >= show:
                    break
                p = prompt_of(e)
                g = gaps[row, len(p) - 1 : len(e.tokens) - 1]
                shown.append(
                    SampleView(
                        prompt=tokenizer.decode(p.tolist()),
                        completion=tokenizer.decode(e.tokens[len(p) :].tolist()),
                        tokens=len(e.tokens) - len(p),
                        mean_gap=float(g.mean()) if len(g) else 0.0,
                        max_gap=float(g.max()) if len(g) else 0.0,
                    )
                )
    finally:
        hi, lo = (int(x) for x in state.tolist())
        mx.random.seed((hi << 32) | lo)  # exactly the key training had
    return {"val_reverse_kl": total / max(count, 1), "val_sampled_tokens": count}, shown
