"""One model's pass over the benchmark's data: the text, mcq and preference phases, and its speed test.

Models are scored one at a time (benchmark.py loads one, runs `score_model`, frees it), so peak memory is the
largest model plus one batch. The reference goes first: its text pass writes its distributions into the
`ReferenceStore`, which every candidate's text pass then reads back batch by batch; its mcq and preference
scores are per-example numbers, kept in memory like every model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from distillery_contract.specs import BenchmarkSpeed

from . import data as data_mod
from . import models
from .benchmark_metrics import measure_speed, reference_view, self_sums, sequence_logprobs, text_sums
from .benchmark_store import ReferenceStore
from .errors import Cancelled
from .train import Hooks


@dataclass
class Workload:
    """The tokenized examples of each phase; every model sees the very same batches in the same order."""

    text: list[data_mod.Example]
    mcq: list[data_mod.Example]
    preference: list[data_mod.Example]
    batch_size: int
    pad_id: int

    def n_batches(self, examples: list[data_mod.Example]) -> int:
        return len(data_mod.eval_batches([len(e.tokens) for e in examples], self.batch_size)) if examples else 0

    @property
    def batches_per_model(self) -> int:
        return sum(self.n_batches(ex) for ex in (self.text, self.mcq, self.preference))

    @property
    def text_positions(self) -> int:
        """Target positions of the text phase: the rows of the reference store."""
        return int(sum(e.target_mask[1:].sum() for e in self.text))


@dataclass
class Batch:
    example_ids: np.ndarray
    tokens: mx.array  # [B, L]
    target_mask: mx.array  # [B, L], aligned with tokens like `data.Example.target_mask`
    positions: mx.array  # flat indices into [B, L - 1] of the positions predicting a target
    targets: mx.array  # the target token at each of those positions


def batches(examples: list[data_mod.Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    for idx in data_mod.eval_batches([len(e.tokens) for e in examples], batch_size):
        tokens, mask = data_mod.collate([examples[i] for i in idx], pad_id)
        positions = np.flatnonzero(mask[:, 1:])
        yield Batch(
            idx,
            mx.array(tokens),
            mx.array(mask),
            mx.array(positions.astype(np.int32)),
            mx.array(tokens[:, 1:].reshape(-1)[positions]),
        )


class Progress:
    """Work units done out of the whole benchmark's: one batch of one phase for one model, or one run of a
    model's speed test (its warm-up and each repeat: `speed_runs`). Reported once at the start (0 done) and
    after each unit, so a display reaches the total only when the last unit has finished. `check` raises `Cancelled` when the caller asks to stop."""

    def __init__(self, total: int, hooks: Hooks, on_progress: Callable[[dict], None] | None):
        self.total, self.hooks, self.on_progress, self.done = total, hooks, on_progress, 0

    def start(self) -> None:
        self._report("preflight", None)

    def check(self, phase: str) -> None:
        if self.hooks.should_stop and self.hooks.should_stop():
            raise Cancelled(f"benchmark cancelled during the {phase} phase")

    def advance(self, phase: str, label: str) -> None:
        self.done += 1
        self._report(phase, label)

    def _report(self, phase: str, label: str | None) -> None:
        if self.on_progress:
            self.on_progress({"step": self.done, "total_steps": self.total, "phase": phase, "label": label})


@dataclass
class ModelScores:
    """What one model's pass produced; benchmark.py turns it into report metrics."""

    parameters: int
    text: dict[str, float] | None = None  # accumulated `text_sums`
    mcq: tuple[np.ndarray, np.ndarray] | None = None  # (summed log-likelihood, tokens) per example
    preference: tuple[np.ndarray, np.ndarray] | None = None  # likewise, chosen and rejected interleaved
    speed: dict = field(default_factory=dict)


def score_model(
    model,
    tokenizer,
    n_params: int,
    label: str,
    work: Workload,
    store: ReferenceStore,
    is_reference: bool,
    speed: BenchmarkSpeed,
    progress: Progress,
    hooks: Hooks,
) -> ModelScores:
    """Every phase for one loaded model. The reference (first) fills `store`; candidates read it."""
    scores = ModelScores(parameters=n_params)
    if work.text:
        hooks.event("phase", f"text: {label}, {len(work.text)} sequences", phase="text", label=label)
        scores.text = text_pass(model, work, store, is_reference, progress, label)
    for phase, examples, what in (
        ("mcq", work.mcq, f"{len(work.mcq)} choices"),
        ("preference", work.preference, f"{len(work.preference) // 2} pairs"),
    ):
        if examples:
            hooks.event("phase", f"{phase}: {label}, {what}", phase=phase, label=label)
            setattr(scores, phase, loglik_pass(model, examples, work, phase, progress, label))
    if speed.enabled:
        progress.check("speed")
        hooks.event("phase", f"speed: {label}", phase="speed", label=label)
        models.quantized_compute(model)  # generation speed as users get it: MLX's quantized kernels

        def run_done() -> None:  # each run of the speed test is a unit of the benchmark's progress
            progress.advance("speed", label)
            progress.check("speed")

        scores.speed = measure_speed(
            model, tokenizer, speed.prompt_tokens, speed.decode_tokens, speed.repeats, on_run=run_done
        )
    return scores


def text_pass(
    model, work: Workload, store: ReferenceStore, write_reference: bool, progress: Progress, label: str
) -> dict[str, float]:
    """Accumulated `text_sums` over the text batches, at their target positions only.

    The reference appends its distribution to `store` and scores only its cross-entropy (`self_sums`: against
    itself KL and JS are exactly 0, top-1 and top-5 exactly 1); a candidate compares with the stored one,
    each full-vocabulary array computed once per batch (`text_sums`).
    """
    totals: dict[str, float] = {}
    for i, batch in enumerate(batches(work.text, work.batch_size, work.pad_id)):
        progress.check("text")
        logits = model(batch.tokens[:, :-1])
        logits = logits.reshape(-1, logits.shape[-1])[batch.positions]  # [N, V]: the target positions
        mask = mx.ones(batch.targets.shape)
        if write_reference:
            ref = reference_view(logits)
            mx.eval(ref)
            store.append(*ref)
            sums = self_sums(ref[0], batch.targets, mask)  # against itself: only the cross-entropy to compute
        else:
            sums = text_sums(store.read(i), logits, batch.targets, mask)
        mx.eval(sums)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v.item())
        progress.advance("text", label)
    if write_reference:
        store.seal()
    return totals


def loglik_pass(
    model, examples: list[data_mod.Example], work: Workload, phase: str, progress: Progress, label: str
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-likelihood of the targets, number of targets) of every example, in example order."""
    ll, n = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for batch in batches(examples, work.batch_size, work.pad_id):
        progress.check(phase)
        batch_ll, batch_n = sequence_logprobs(model, batch.tokens, batch.target_mask)
        mx.eval(batch_ll, batch_n)
        ll[batch.example_ids], n[batch.example_ids] = np.array(batch_ll, dtype=np.float64), np.array(batch_n)
        progress.advance(phase, label)
    return ll, n
