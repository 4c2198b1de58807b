"""The training loop: one short loop around `Trainer.train_step`, with evaluation, guards, checkpoints, exact resume.

`Trainer.train_step` is the one place a training step is computed: the loop, the learning-rate search and
bench/step_speed.py all call it.

Each step takes `grad_accum` micro-batches (length-bucketed, order fixed by seed and epoch), computes the
distillation loss against the teachers, averages the gradients, clips them, and applies AdamW with the stage's
learning rate. Before any training:

- the starting student is evaluated and is the first candidate for best (step 0): a run in which no trained
  step beats it ships it unchanged, and says so;
- with `learning_rate: auto` a short search picks the rate (`lr_search.py`).

While training, the divergence guard (`guard.py`) skips the update of a lone spiking step and rolls the run
back to its best checkpoint, with a lower rate, when it diverges. Everything needed to continue identically —
weights, optimizer moments, the data position, the best score, the guard's window and rate scale, the chosen
rate — is in each checkpoint; the random key is reseeded from (seed, step) each step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from distillery_contract.specs import DistillSpec, TrainingSpec

from . import compiled_step, evaluate, losses, lr_search, schedule
from . import data as data_mod
from . import guard as guard_mod
from . import hidden as hidden_mod
from . import preference as preference_mod
from . import student as student_mod
from . import weighting as weighting_mod
from .batches import Split
from .checkpoints import Checkpoints
from .errors import Cancelled
from .mlx_typed import flat_arrays


@dataclass
class Hooks:
    """How the caller (CLI or worker) hears about the run and asks it to stop."""

    on_metrics: Callable[[dict], None] | None = None  # every logged record (train step or eval)
    on_event: Callable[[str, str, dict], None] | None = None  # (kind, message, data)
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None  # cooperative cancellation

    def metrics(self, record: dict) -> None:
        if self.on_metrics:
            self.on_metrics(record)

    def event(self, kind: str, message: str, **data) -> None:
        if self.on_event:
            self.on_event(kind, message, data)


# What picks the best checkpoint (and what the guard and the learning-rate search watch), with its name in
# messages: the KL to the teachers on held-out data; on_policy, the reverse KL on the student's own samples;
# plain fine-tuning (`loss.alpha: 0` everywhere: no teacher in the loss), the cross-entropy on held-out text.
SCORE_LABELS = {"val_kl": "val KL", "val_reverse_kl": "reverse KL on samples", "val_ce": "held-out cross-entropy"}


def score_name(spec: DistillSpec) -> str:
    """The run's score (a key of SCORE_LABELS)."""
    if spec.teacher_mode == "on_policy":
        return "val_reverse_kl"
    alphas = {spec.loss.alpha} | {s.loss.alpha for s in spec.training.stages if s.loss and s.loss.alpha is not None}
    return "val_ce" if alphas == {0.0} else "val_kl"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    learning_rate: float | None = None  # the peak rate: the spec's, or the one the search chose
    lr_search: dict | None = None
    best_step: int | None = None
    score_name: str = "val_kl"  # what the best is chosen by (score_name): the best score is best_val_kl
    best_val_kl: float = math.inf
    evals_since_best: int = 0
    initial: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    stopped_early: bool = False
    stop_reason: str | None = None  # None while running; "early_stopping" or "diverged" when cut short
    lr_scale: float = 1.0  # lowered by each rollback
    rollbacks: list = field(default_factory=list)
    skipped_steps: int = 0
    recent_losses: list = field(default_factory=list)
    recent_grad_norms: list = field(default_factory=list)
    guard_spikes: int = 0
    teacher_tokens: int = 0  # tokens the teachers scored in training steps (online, on_policy)
    generated_tokens: int = 0  # tokens the student sampled in training steps (on_policy)
    generate_seconds: float = 0.0
    score_seconds: float = 0.0


class BatchOrder:
    """Length-bucketed batches, reshuffled every epoch from (seed, epoch): restartable at any position."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed

    def next(self, state: TrainState) -> np.ndarray:
        batches = data_mod.length_batches(self.lengths, self.batch_size, self.seed, state.epoch)
        if state.batch_in_epoch >= len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            batches = data_mod.length_batches(self.lengths, self.batch_size, self.seed, state.epoch)
        idx = batches[state.batch_in_epoch]
        state.batch_in_epoch += 1
        return idx


@dataclass
class StepResult:
    loss: float
    grad_norm: float  # before clipping
    target_tokens: int
    tokens: int
    grads: dict  # averaged and clipped
    cost: dict = field(default_factory=dict)  # on_policy: generated / teacher tokens, generate / score seconds
    verdict: guard_mod.Verdict = field(default_factory=lambda: guard_mod.Verdict(guard_mod.OK))  # OK: applied


class Trainer:
    """The model, its data and its loss: takes training steps (`train_step`), evaluates."""

    def __init__(
        self,
        student: student_mod.Student,
        train_split: Split,
        valid_split: Split,
        tr: TrainingSpec,
        weighting: weighting_mod.Weighting,
        sampled_eval: Callable[[int | None, bool], tuple[dict, list]] | None = None,
        score: str | None = None,
        hints: hidden_mod.Hints | None = None,
        hint_teacher: int = 0,
        preference: preference_mod.PreferenceTerm | None = None,
    ):
        """`sampled_eval(max_prompts, show)` (on_policy): metrics on the student's own samples (and, with `show`,
        a few of them), merged into every evaluation. `score`: what picks the best checkpoint (a key of
        SCORE_LABELS; default `val_reverse_kl` with `sampled_eval`, else `val_kl`)."""
        self.model, self.acfg = student.model, student.adapter_config
        self.sampled_eval = sampled_eval
        self.score_name = score or ("val_reverse_kl" if sampled_eval else "val_kl")
        # held-out prompts alone (on_policy) have no tokens of the data's own to take the val KL on
        self.dataset_eval = sampled_eval is None or any(e.target_mask.any() for e in valid_split.examples)
        self.score_label = SCORE_LABELS[self.score_name]  # in messages
        self.hints, self.hint_teacher = hints, hint_teacher  # loss.hidden: set up before the step is compiled
        self.preference = preference  # data.preference: evaluated; with loss.preference (weight > 0) trained
        self.last_samples: list = []
        self.train_split, self.valid_split, self.tr, self.weighting = train_split, valid_split, tr, weighting
        self.pad_id = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0
        self.order = BatchOrder(train_split.lengths, tr.batch_size, tr.seed)
        self._loss_and_grad = nn.value_and_grad(self.model, self._loss)
        if compiled_step.wanted():  # on the CPU: forward and backward as one compiled graph
            self._loss_and_grad = compiled_step.CompiledGradients(self.model, self._loss_and_grad)

    def _loss(self, model, tokens, mask, teachers, weights, loss_cfg):
        logits = model(tokens[:, :-1])
        loss, ntok = losses.distill_loss(logits, tokens[:, 1:], mask, teachers, weights, loss_cfg)
        if self.hints is not None and teachers:  # the layers' outputs of the forward above, against the teacher's
            loss = loss + self.hints.loss(model, teachers[self.hint_teacher].hidden, mask)
        return loss, ntok

    def train_step(
        self,
        state: TrainState,
        loss_cfg,
        optimizer,
        *,
        seed_step: int,
        check: Callable[[StepResult], guard_mod.Verdict] | None = None,
    ) -> StepResult:
        """One optimizer step at the optimizer's current learning rate: the micro-batches taken from `state`'s
        data position (which advances), the random key reseeded from (seed, `seed_step`) for dropout, the
        averaged and clipped gradients, then the AdamW update, unless `check` (called with the result before
        the update) returns a verdict other than OK. The verdict is in the result (`verdict`)."""
        mx.random.seed(self.tr.seed * 1_000_003 + seed_step)  # dropout's randomness: a function of (seed, step)
        result = self._gradients(state, loss_cfg, seed_step)
        if check is not None:
            result.verdict = check(result)
        if result.verdict.action == guard_mod.OK:
            self._apply(optimizer, result.grads)
        return result

    def _gradients(self, state: TrainState, loss_cfg, seed_step: int = 0) -> StepResult:
        """Gradients of one optimizer step (its micro-batches taken from `state`'s data position)."""
        grads, loss_sum, ntoks, n_in = None, 0.0, 0, 0
        cost: dict[str, float] = {}
        for _ in range(self.tr.grad_accum):
            idx = self.order.next(state)
            with_teachers = loss_cfg.alpha > 0 or self.hints is not None
            tokens, mask, teachers = self.train_split.batch(idx, self.pad_id, with_teachers=with_teachers)
            for k, v in getattr(self.train_split, "last", {}).items():  # on_policy's cost of the batch
                cost[k] = cost.get(k, 0) + v
            weights = self.weighting.weights(tokens, mask, teachers) if loss_cfg.alpha > 0 else None  # [n, B]
            (loss, ntok), g = self._loss_and_grad(self.model, tokens, mask, teachers, weights, loss_cfg)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, ntok, grads)
            if loss_cfg.alpha > 0:
                self.weighting.learn(tokens, mask, teachers)  # the learned gate's own step; others: nothing
            loss_sum += loss.item()
            ntoks += int(ntok.item())
            n_in += int(sum(min(len(self.train_split.examples[i].tokens), tokens.shape[1]) for i in idx))
        assert grads is not None  # grad_accum >= 1: there was a micro-batch
        if self.tr.grad_accum > 1:
            grads = tree_map(lambda g: g / self.tr.grad_accum, grads)
        if self.preference is not None and self.preference.weight > 0:  # its pairs drawn from (seed, step)
            cost["preference_loss"], g = self.preference.gradients(self.model, seed_step)
            grads = tree_map(mx.add, grads, g)
        if self.tr.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, self.tr.max_grad_norm)
        else:  # the guard watches the norm even when nothing clips it
            norm = mx.sqrt(sum((mx.sum(g.astype(mx.float32) ** 2) for _, g in flat_arrays(grads)), mx.array(0.0)))
        return StepResult(loss_sum / self.tr.grad_accum, float(norm.item()), ntoks, n_in, grads, cost)

    def _apply(self, optimizer, grads: dict) -> None:
        optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), optimizer.state)

    def evaluate(self, max_batches: int | None = None, spread: bool = False) -> dict:
        """Validation metrics; `spread` takes `max_batches` batches across the split, not the shortest ones."""
        batches = data_mod.eval_batches(self.valid_split.lengths, self.tr.batch_size)
        if max_batches and spread and len(batches) > max_batches:
            batches = [batches[i] for i in np.linspace(0, len(batches) - 1, max_batches).round().astype(int)]
        elif max_batches:
            batches = batches[:max_batches]
        metrics = (
            evaluate.evaluate(self.model, self.valid_split, self.weighting, self.pad_id, batches)
            if self.dataset_eval
            else {}
        )
        if self.sampled_eval is not None:  # the learning-rate search's short evaluations (spread): fewer prompts
            few = max_batches * self.tr.batch_size if spread and max_batches else None
            sampled, self.last_samples = self.sampled_eval(few, not spread)
            metrics.update(sampled)
        if self.preference is not None and not spread:
            metrics.update(self.preference.evaluate(self.model))
        return metrics

    def score(self, metrics: dict) -> float:
        """What picks the best checkpoint and what the guard and the learning-rate search watch."""
        return float(metrics[self.score_name])

    def trainable(self) -> list[tuple[str, mx.array]]:
        """The trainable arrays as they are now (MLX arrays are immutable: holding them is a snapshot)."""
        return flat_arrays(self.model.trainable_parameters())

    def set_trainable(self, snapshot: list[tuple[str, mx.array]]) -> None:
        self.model.update(tree_unflatten(snapshot))
        mx.eval(self.model.parameters())


class _AdamW(optim.AdamW):
    """MLX's AdamW, unchanged, plus the lr multiplier of its one parameter group (for `set_learning_rate`)."""

    lr_mults: list[float]


class _MultiOptimizer(optim.MultiOptimizer):
    """MLX's MultiOptimizer, unchanged, plus each sub-optimizer's lr multiplier, in order."""

    lr_mults: list[float]


GroupedOptimizer = _AdamW | _MultiOptimizer  # what make_optimizer returns: set_learning_rate reads its lr_mults


def make_optimizer(mults: dict[str, float], weight_decay: float) -> GroupedOptimizer:
    """AdamW, or one AdamW per distinct lr multiplier when param groups ask for several."""
    values = sorted(set(mults.values()))
    if len(values) == 1:
        opt = _AdamW(learning_rate=0.0, weight_decay=weight_decay)
        opt.lr_mults = [values[0]]
        return opt
    groups = [{n for n, m in mults.items() if m == v} for v in values]
    opts = [optim.AdamW(learning_rate=0.0, weight_decay=weight_decay) for _ in values]
    multi = _MultiOptimizer(opts, [lambda name, _g, names=names: name in names for names in groups[:-1]])
    multi.lr_mults = values
    return multi


def set_learning_rate(optimizer: GroupedOptimizer, lr: float) -> None:
    subs = optimizer.optimizers if isinstance(optimizer, optim.MultiOptimizer) else [optimizer]
    for sub, mult in zip(subs, optimizer.lr_mults):
        sub.learning_rate = lr * mult


def train(
    student: student_mod.Student,
    train_split: Split,
    valid_split: Split,
    spec: DistillSpec,
    weighting: weighting_mod.Weighting,
    out_dir: Path,
    hooks: Hooks,
    on_progress: Callable[[dict], None] | None = None,
    sampled_eval: Callable[[int | None, bool], tuple[dict, list]] | None = None,
    hints: hidden_mod.Hints | None = None,
    preference: preference_mod.PreferenceTerm | None = None,
) -> TrainState:
    tr = spec.training
    hint_teacher = spec.loss.hidden.teacher if spec.loss.hidden else 0
    trainer = Trainer(
        student,
        train_split,
        valid_split,
        tr,
        weighting,
        sampled_eval,
        score_name(spec),
        hints,
        hint_teacher,
        preference,
    )
    model, acfg = trainer.model, trainer.acfg
    guard = guard_mod.DivergenceGuard(tr.divergence_guard)
    ckpts = Checkpoints(out_dir / "checkpoints", tr.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        hooks.metrics(record)

    def run_eval(step: int) -> dict:
        t0 = time.perf_counter()
        record = {
            "step": step,
            "kind": "eval",
            **trainer.evaluate(tr.eval_batches),
            "eval_seconds": time.perf_counter() - t0,
        }
        log(record)
        if trainer.last_samples:
            hooks.event(
                "samples",
                f"step {step}: {len(trainer.last_samples)} of the student's samples for held-out prompts",
                step=step,
                samples=[vars(s) for s in trainer.last_samples],
            )
        return record

    latest = ckpts.latest()
    if latest is not None:
        state = TrainState(**Checkpoints.read_state(latest))
        stages = schedule.stages(tr, spec.loss, state.learning_rate)
        stage = schedule.stage_at(stages, state.step)
        optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
        Checkpoints.restore(latest, model, optimizer if state.step != stage.start else None, weighting)
        ckpts.drop_after(state.step)
        _truncate_metrics(metrics_path, state.step)
        hooks.event("resumed", f"resumed from checkpoint at step {state.step}", step=state.step)
    else:
        metrics_path.unlink(missing_ok=True)
        ckpts.drop_after(-1)  # best checkpoints of a run killed before its first step checkpoint
        state = TrainState(score_name=trainer.score_name)
        state.initial = state.last_eval = run_eval(0)
        state.learning_rate, state.lr_search = _peak_rate(trainer, spec, state, hooks)
        stages = schedule.stages(tr, spec.loss, state.learning_rate)
        stage = schedule.stage_at(stages, 0)
        optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
        # the starting student is the first candidate for best: a run that never beats it ships it
        state.best_step, state.best_val_kl, state.best_eval = 0, trainer.score(state.initial), state.initial
        ckpts.save_best(model, optimizer, acfg, state, stage.index, weighting)

    def roll_back(reason: str):
        """Back to the best checkpoint with a lower rate; None when the rollbacks are used up (stop)."""
        if len(state.rollbacks) >= tr.divergence_guard.max_rollbacks:
            state.stop_reason = "diverged"
            hooks.event(
                "diverged",
                f"training diverged at step {state.step} ({reason}) after "
                f"{len(state.rollbacks)} rollbacks; stopping, the best checkpoint (step {state.best_step}) "
                "is kept",
                step=state.step,
                reason=reason,
            )
            return None
        assert state.best_step is not None  # set before the first step: the starting student is the first best
        best = ckpts.best_path(state.best_step)
        fresh = _setup_stage(model, acfg, stage, tr.weight_decay)
        same_stage = json.loads((best / "best.json").read_text())["stage"] == stage.index
        Checkpoints.restore(best, model, fresh if same_stage else None, weighting)
        state.lr_scale *= tr.divergence_guard.lr_factor
        guard.forget(state)
        state.rollbacks.append(
            {"step": state.step, "to_step": state.best_step, "reason": reason, "lr_scale": state.lr_scale}
        )
        hooks.event(
            "rollback",
            f"step {state.step}: {reason}; rolled back to step {state.best_step} and the "
            f"learning rate scaled to x{state.lr_scale:g} (rollback {len(state.rollbacks)} of "
            f"{tr.divergence_guard.max_rollbacks})",
            **state.rollbacks[-1],
        )
        return fresh

    while state.step < tr.steps and state.stop_reason is None:
        if hooks.should_stop and hooks.should_stop():
            ckpts.save(model, optimizer, acfg, state, weighting)
            raise Cancelled(f"cancelled at step {state.step}")
        new_stage = schedule.stage_at(stages, state.step)
        if new_stage.index != stage.index:
            stage = new_stage
            optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
            hooks.event("stage", f"stage {stage.name} starts at step {state.step}", stage=stage.name)
        lr = schedule.learning_rate(stage, state.step, tr.lr_schedule, tr.min_lr_ratio) * state.lr_scale
        set_learning_rate(optimizer, lr)

        t0 = time.perf_counter()
        result = trainer.train_step(
            state,
            stage.loss,
            optimizer,
            seed_step=state.step,
            check=lambda r: guard.check_step(state, r.loss, r.grad_norm),
        )
        verdict = result.verdict
        dt = time.perf_counter() - t0

        state.step += 1
        state.tokens += result.tokens
        state.wall_seconds += dt
        state.teacher_tokens += int(result.cost.get("teacher_tokens", 0))
        state.generated_tokens += int(result.cost.get("generated_tokens", 0))
        state.generate_seconds += float(result.cost.get("generate_seconds", 0.0))
        state.score_seconds += float(result.cost.get("score_seconds", 0.0))
        record = {
            "step": state.step,
            "kind": "train",
            "stage": stage.name,
            "loss": result.loss,
            "lr": lr,
            "target_tokens": result.target_tokens,
            "tokens": result.tokens,
            "tokens_per_second": result.tokens / dt,
            "grad_norm": result.grad_norm,
        }
        if result.cost:
            record.update({k: v for k, v in result.cost.items() if k != "on_policy"})
        if "generate_seconds" in result.cost or "score_seconds" in result.cost:
            record["update_seconds"] = dt - result.cost.get("generate_seconds", 0) - result.cost.get("score_seconds", 0)
        if verdict.action != guard_mod.OK:
            record["guard"] = verdict.action
        log(record)
        if verdict.action == guard_mod.SKIP:
            state.skipped_steps += 1
            hooks.event(
                "guard",
                f"step {state.step}: {verdict.reason}; its update is skipped",
                step=state.step,
                reason=verdict.reason,
            )
        elif verdict.action == guard_mod.ROLLBACK:
            optimizer = roll_back(verdict.reason) or optimizer
        if on_progress:
            rate = state.wall_seconds / state.step if state.step else 0
            on_progress({**record, "total_steps": tr.steps, "eta_seconds": rate * (tr.steps - state.step)})

        if state.stop_reason is None and (state.step % tr.eval_every == 0 or state.step == tr.steps):
            state.last_eval = run_eval(state.step)
            if not _track_best(state, tr, hooks, trainer):
                verdict = guard.check_eval(trainer.score(state.last_eval), state.best_val_kl, trainer.score_label)
                if verdict.action == guard_mod.ROLLBACK:
                    optimizer = roll_back(verdict.reason) or optimizer
            if state.best_step == state.step:
                ckpts.save_best(model, optimizer, acfg, state, stage.index, weighting)
        if state.step % tr.checkpoint_every == 0 or state.step == tr.steps or state.stop_reason:
            path = ckpts.save(model, optimizer, acfg, state, weighting)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(state.step, path)
    hidden_mod.detach(model)  # the hints' projections are the run's, not the student's: they do not ship
    return state


def _peak_rate(trainer: Trainer, spec: DistillSpec, state: TrainState, hooks: Hooks) -> tuple[float, dict | None]:
    """The spec's learning rate, or with `auto` the one a short search chooses (and its record)."""
    tr = spec.training
    if tr.learning_rate != "auto":
        return float(tr.learning_rate), None
    stage_rates = [s.learning_rate for s in tr.stages if s.learning_rate is not None]
    if tr.stages and len(stage_rates) == len(tr.stages):
        hooks.event("lr_search", "every stage sets its own learning rate: no search")
        return float(min(stage_rates)), None
    kind = trainer.acfg.get("fine_tune_type", "lora")
    n_params = sum(v.size for _, v in flat_arrays(trainer.model.parameters()))
    rates = list(tr.lr_search.rates or lr_search.default_rates(kind, n_params))
    steps = lr_search.trial_steps(tr.steps, tr.lr_search.steps)
    stage = schedule.stages(tr, spec.loss, rates[0])[0]
    start_weights, start_gate = trainer.trainable(), trainer.weighting.state()
    start_score = trainer.score(trainer.evaluate(tr.lr_search.eval_batches, spread=True))
    hooks.event(
        "lr_search",
        f"searching the learning rate: {len(rates)} trials of {steps} steps "
        f"({', '.join(f'{r:g}' for r in sorted(rates))})",
        rates=sorted(rates),
        steps=steps,
    )

    def run_trial(rate: float) -> dict:
        optimizer = _setup_stage(trainer.model, trainer.acfg, stage, tr.weight_decay)
        set_learning_rate(optimizer, rate)
        position, losses_seen = TrainState(), []
        for i in range(steps):
            result = trainer.train_step(position, stage.loss, optimizer, seed_step=i, check=_finite)
            losses_seen.append(result.loss)
            if result.verdict.action != guard_mod.OK:
                break
        finite = all(math.isfinite(x) for x in losses_seen)
        val_kl = trainer.score(trainer.evaluate(tr.lr_search.eval_batches, spread=True)) if finite else math.inf
        trainer.set_trainable(start_weights)
        trainer.weighting.load_state(start_gate)  # a trial's gate steps are undone with its student's
        return {"val_kl": val_kl if math.isfinite(val_kl) else math.inf, "last_loss": losses_seen[-1]}

    def on_trial(t: dict) -> None:
        hooks.event(
            "lr_trial",
            f"learning rate {t['learning_rate']:g}: {trainer.score_label} {t['val_kl']:.4f} after {steps} "
            f"steps (start {start_score:.4f})",
            **t,
        )

    result = lr_search.search(rates, steps, start_score, run_trial, on_trial, trainer.score_label)
    hooks.event("lr_search", f"learning rate {result['chosen']:g} chosen ({result['reason']})", **result)
    return result["chosen"], result


def _finite(result: StepResult) -> guard_mod.Verdict:
    """The learning-rate search's check: a trial stops, without the update, at a non-finite loss or gradient."""
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return guard_mod.Verdict(guard_mod.OK)
    return guard_mod.Verdict(
        guard_mod.ROLLBACK, f"non-finite loss or gradient (loss {result.loss}, gradient norm {result.grad_norm})"
    )


def _setup_stage(model, acfg: dict, stage: schedule.Stage, weight_decay: float) -> GroupedOptimizer:
    """Trainable set and optimizer for a stage: its param groups decide lr multipliers and frozen parameters."""
    student_mod.unfreeze_trainable(model, acfg)
    mults = student_mod.apply_param_groups(model, stage.param_groups)
    return make_optimizer(mults, weight_decay)


def _track_best(state: TrainState, tr: TrainingSpec, hooks: Hooks, trainer: Trainer) -> bool:
    """Whether the last evaluation is the new best; counts evaluations without improvement for early stopping."""
    val_kl = trainer.score(state.last_eval)
    if val_kl < state.best_val_kl - tr.early_stopping_min_delta:
        state.best_val_kl, state.best_step, state.evals_since_best = val_kl, state.step, 0
        state.best_eval = state.last_eval
        return True
    state.evals_since_best += 1
    patience = tr.early_stopping_patience
    if patience is not None and state.evals_since_best >= patience:
        state.stopped_early, state.stop_reason = True, "early_stopping"
        hooks.event(
            "early_stopping",
            f"{trainer.score_label} did not improve for {patience} evaluations; stopping at step "
            f"{state.step} (best {state.best_val_kl:.4f} at step {state.best_step})",
            step=state.step,
        )
    return False


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
