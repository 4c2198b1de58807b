"""The training loop: one short loop over optimizer steps, with evaluation, checkpoints and exact resume.

Each step: take `grad_accum` micro-batches (length-bucketed, order fixed by seed and epoch), compute the
distillation loss against the teachers, average the gradients, clip, and apply AdamW with the stage's
learning rate. Everything needed to continue identically — adapter weights, optimizer moments, the data
position, the best score — goes into each checkpoint; the random key is reseeded from (seed, step) each step.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import data as data_mod
from . import evaluate, losses, schedule
from . import student as student_mod
from .batches import Split
from .errors import Cancelled
from .spec import DistillSpec


@dataclass
class Hooks:
    """How the caller (CLI or worker) hears about the run and asks it to stop."""

    on_metrics: Callable[[dict], None] | None = None            # every logged record (train step or eval)
    on_event: Callable[[str, str, dict], None] | None = None    # (kind, message, data)
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None               # cooperative cancellation

    def metrics(self, record: dict) -> None:
        if self.on_metrics:
            self.on_metrics(record)

    def event(self, kind: str, message: str, **data) -> None:
        if self.on_event:
            self.on_event(kind, message, data)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    best_step: int | None = None
    best_val_kl: float = math.inf
    evals_since_best: int = 0
    initial: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best_eval: dict = field(default_factory=dict)
    stopped_early: bool = False


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


class Checkpoints:
    """`checkpoints/step-NNNNNNN/` folders (the newest `keep` are kept) and `checkpoints/best/`."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def save(self, model, optimizer, acfg: dict, state: TrainState) -> Path:
        path = self.root / f"step-{state.step:07d}"
        tmp = self.root / f".tmp-{state.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        student_mod.save_adapter(model, acfg, tmp)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def save_best(self, model, acfg: dict, state: TrainState) -> None:
        tmp = self.root / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        student_mod.save_adapter(model, acfg, tmp)
        (tmp / "best.json").write_text(json.dumps({"step": state.step, "val_kl": state.best_val_kl}))
        shutil.rmtree(self.root / "best", ignore_errors=True)
        tmp.rename(self.root / "best")

    @staticmethod
    def restore(path: Path, model, optimizer, with_optimizer: bool = True) -> TrainState:
        model.load_weights(str(path / "adapters.safetensors"), strict=False)
        if with_optimizer:  # not at a stage boundary, where the next stage starts a fresh optimizer anyway
            optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        return TrainState(**json.loads((path / "state.json").read_text()))


def make_optimizer(mults: dict[str, float], weight_decay: float) -> optim.Optimizer:
    """AdamW, or one AdamW per distinct lr multiplier when param groups ask for several."""
    values = sorted(set(mults.values()))
    if len(values) == 1:
        opt = optim.AdamW(learning_rate=0.0, weight_decay=weight_decay)
        opt.lr_mults = [values[0]]
        return opt
    groups = [{n for n, m in mults.items() if m == v} for v in values]
    opts = [optim.AdamW(learning_rate=0.0, weight_decay=weight_decay) for _ in values]
    multi = optim.MultiOptimizer(opts, [lambda name, _g, names=names: name in names for names in groups[:-1]])
    multi.lr_mults = values
    return multi


def set_learning_rate(optimizer, lr: float) -> None:
    subs = optimizer.optimizers if isinstance(optimizer, optim.MultiOptimizer) else [optimizer]
    for sub, mult in zip(subs, optimizer.lr_mults):
        sub.learning_rate = lr * mult


def train(student: student_mod.Student, train_split: Split, valid_split: Split, spec: DistillSpec,
          teacher_weights: list[float], out_dir: Path, hooks: Hooks,
          on_progress: Callable[[dict], None] | None = None) -> TrainState:
    tr = spec.training
    model, acfg = student.model, student.adapter_config
    pad_id = student.tokenizer.pad_token_id if student.tokenizer.pad_token_id is not None else 0
    weights = losses.FixedWeights(teacher_weights)
    all_stages = schedule.stages(tr, spec.loss)
    order = BatchOrder(train_split.lengths, tr.batch_size, tr.seed)
    ckpts = Checkpoints(out_dir / "checkpoints", tr.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"

    def run_eval(step: int) -> dict:
        t0 = time.perf_counter()
        result = evaluate.evaluate(model, valid_split, weights, tr.batch_size, pad_id, tr.eval_batches)
        record = {"step": step, "kind": "eval", **result, "eval_seconds": time.perf_counter() - t0}
        log(record)
        return record

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        hooks.metrics(record)

    def loss_fn(model, tokens, mask, teachers, loss_cfg):
        logits = model(tokens[:, :-1])
        return losses.distill_loss(logits, tokens[:, 1:], mask, teachers, weights, loss_cfg)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    stage = schedule.stage_at(all_stages, 0)
    optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
    state = TrainState()
    latest = ckpts.latest()
    if latest is not None:
        at = json.loads((latest / "state.json").read_text())["step"]
        stage = schedule.stage_at(all_stages, at)
        optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
        state = Checkpoints.restore(latest, model, optimizer, with_optimizer=at != stage.start)
        _truncate_metrics(metrics_path, state.step)
        hooks.event("resumed", f"resumed from checkpoint at step {state.step}", step=state.step)
    else:
        metrics_path.unlink(missing_ok=True)
        state.initial = run_eval(0)
        state.last_eval = state.initial

    while state.step < tr.steps and not state.stopped_early:
        if hooks.should_stop and hooks.should_stop():
            ckpts.save(model, optimizer, acfg, state)
            raise Cancelled(f"cancelled at step {state.step}")
        new_stage = schedule.stage_at(all_stages, state.step)
        if new_stage.index != stage.index:
            stage = new_stage
            optimizer = _setup_stage(model, acfg, stage, tr.weight_decay)
            hooks.event("stage", f"stage {stage.name} starts at step {state.step}", stage=stage.name)
        mx.random.seed(tr.seed * 1_000_003 + state.step)  # dropout's randomness: a function of (seed, step)
        lr = schedule.learning_rate(stage, state.step, tr.lr_schedule, tr.min_lr_ratio)
        set_learning_rate(optimizer, lr)

        t0 = time.perf_counter()
        grads, loss_sum, ntoks, n_in = None, 0.0, 0, 0
        for _ in range(tr.grad_accum):
            idx = order.next(state)
            tokens, mask, teachers = train_split.batch(idx, pad_id, with_teachers=stage.loss.alpha > 0)
            (loss, ntok), g = loss_and_grad(model, tokens, mask, teachers, stage.loss)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, ntok, grads)
            loss_sum += loss.item()
            ntoks += int(ntok.item())
            n_in += int(sum(min(len(train_split.examples[i].tokens), tokens.shape[1]) for i in idx))
        if tr.grad_accum > 1:
            grads = tree_map(lambda g: g / tr.grad_accum, grads)
        grad_norm = None
        if tr.max_grad_norm is not None:
            grads, grad_norm = optim.clip_grad_norm(grads, tr.max_grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        dt = time.perf_counter() - t0

        state.step += 1
        state.tokens += n_in
        state.wall_seconds += dt
        record = {"step": state.step, "kind": "train", "stage": stage.name, "loss": loss_sum / tr.grad_accum,
                  "lr": lr, "target_tokens": ntoks, "tokens": n_in, "tokens_per_second": n_in / dt,
                  "grad_norm": float(grad_norm.item()) if grad_norm is not None else None}
        log(record)
        if on_progress:
            rate = state.wall_seconds / state.step if state.step else 0
            on_progress({**record, "total_steps": tr.steps, "eta_seconds": rate * (tr.steps - state.step)})

        if state.step % tr.eval_every == 0 or state.step == tr.steps:
            state.last_eval = run_eval(state.step)
            _track_best(state, model, acfg, ckpts, tr.early_stopping_patience, tr.early_stopping_min_delta, hooks)
        if state.step % tr.checkpoint_every == 0 or state.step == tr.steps or state.stopped_early:
            path = ckpts.save(model, optimizer, acfg, state)
            if hooks.on_checkpoint:
                hooks.on_checkpoint(state.step, path)
    return state


def _setup_stage(model, acfg: dict, stage: schedule.Stage, weight_decay: float) -> optim.Optimizer:
    """Trainable set and optimizer for a stage: its param groups decide lr multipliers and frozen parameters."""
    student_mod.unfreeze_trainable(model, acfg)
    mults = student_mod.apply_param_groups(model, stage.param_groups)
    return make_optimizer(mults, weight_decay)


def _track_best(state: TrainState, model, acfg: dict, ckpts: Checkpoints, patience: int | None, min_delta: float,
                hooks: Hooks) -> None:
    val_kl = state.last_eval["val_kl"]
    if val_kl < state.best_val_kl - min_delta:
        state.best_val_kl, state.best_step, state.evals_since_best = val_kl, state.step, 0
        state.best_eval = state.last_eval
        ckpts.save_best(model, acfg, state)
    else:
        state.evals_since_best += 1
        if patience is not None and state.evals_since_best >= patience:
            state.stopped_early = True
            hooks.event("early_stopping", f"val KL did not improve for {patience} evaluations; stopping at step "
                        f"{state.step} (best {state.best_val_kl:.4f} at step {state.best_step})", step=state.step)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
