"""Offline distillation training step vs mlx-lm's own LoRA SFT step, same student and batch, in one run.

    .venv/bin/python bench/step_speed.py [--model DIR] [--batch 4] [--seq 128] [--k 64] [--reps 8]
                                         [--variants all|main] [--no-explore] [--quick] [--against REV]

Student: `student.build_student` with keep_layers = every other layer (SmolLM2-135M: 15 of 30) and the
default adapter (LoRA rank 16, scale 20, all linear layers of all kept layers), float32 on CPU
(models.load_model). One student serves every variant (same weights, same LoRA layers).

Baseline ("mlx_lm_sft"): mlx-lm's training step as mlx_lm/tuner/trainer.py's train() builds it:
nn.value_and_grad over mlx_lm.tuner.trainer.default_loss, the step wrapped in
mx.compile(inputs=state, outputs=state) with state = [model.state, optimizer.state, mx.random.state],
AdamW update inside, then mx.eval(state, losses, n_tokens, grad_accum). No clipping (mlx-lm has none).

Candidate ("distill_step"): the engine's own step, `train.Trainer.train_step` (the one the training loop
and the learning-rate search call; nothing here re-implements it), on a Trainer over a Split whose teacher
rows come from a TeacherCache built by cache.build with the full teacher over the same examples (k=64):
LossSpec defaults (forward KL, T=1, alpha=1), TrainingSpec defaults otherwise (grad_accum 1, clipping at
1.0, seed 42), AdamW at 1e-4.

With --variants all (the default) the baseline without mx.compile ("mlx_lm_sft_nocompile": what compile
is worth to mlx-lm) is timed in the same rounds.

What a change to the engine buys is timed against another revision, not against old code kept here:
`--against REV` runs this script (this tree's copy) on this tree's engine and on REV's (a temporary git
worktree), alternating, and prints this tree's RESULT figures over REV's (bench/_common.py, run_against).
REV must have `Trainer.train_step`.

Tokens/s counts batch x seq tokens per step for every variant (the same batch), so ratios are time ratios.
Rounds alternate the variants' order; medians are over the rounds during which other processes used
< 0.15 cores (/proc/stat), or over all rounds when fewer than 3 are clean.
The explore section times the engine's loss alone (forward+backward w.r.t. fixed logits), its
student_buckets, and plain MLX passes over the vocabulary for scale, and checks the engine's buckets against
a float64 NumPy reference.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (first: enables OpenBLAS before MLX is imported)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from _common import np  # noqa: E402
from mlx.nn.utils import average_gradients  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402

from distillery_contract.specs import AdapterSpec, LossSpec, StudentSpec  # noqa: E402
from worker.engine import cache as cache_mod  # noqa: E402
from worker.engine import data as data_mod  # noqa: E402
from worker.engine import losses, models, weighting  # noqa: E402
from worker.engine import student as student_mod  # noqa: E402
from worker.engine import train as train_mod  # noqa: E402
from worker.engine.batches import CachedTeacher, Split  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p)
    _common.add_against_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 128; quick 32)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--distinct-batches", type=int, default=4, help="batches cycled through (cache covers them)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 8; quick 2)")
    p.add_argument("--variants", choices=("all", "main"), default="all")
    p.add_argument("--no-explore", action="store_true")
    args = p.parse_args()
    if args.against:
        return _common.run_against(args.against, args.against_runs)
    args.seq = args.seq or (32 if args.quick else 128)
    args.reps = args.reps or (2 if args.quick else 8)
    _common.header("step_speed: offline distillation step vs mlx-lm LoRA SFT step", args)
    print(f"cpu_memory: {_common.reuse_buffers()}  (as training and cache jobs run)")
    _common.run_in_tmp("bench-step-speed-", run, args)


def run(args, tmp: Path) -> None:
    model_dir = _common.resolve_model(args, tmp)
    teacher, tokenizer, config = models.load_model(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_layers = config["num_hidden_layers"]
    keep = list(range(0, n_layers, 2))
    examples = _common.shakespeare_examples(tokenizer, args.batch * args.distinct_batches, args.seq, tmp)
    lengths = [len(e.tokens) for e in examples]
    batches = data_mod.eval_batches(lengths, args.batch)

    # The teacher cache for these examples, built by the engine with the full teacher.
    cache = cache_mod.build(
        teacher,
        examples,
        tmp / "cache",
        key="bench",
        top_k=args.k,
        batch_size=8,
        pad_id=pad_id,
        meta={},
        sample_batches=0,
    )
    print(
        f"teacher cache: {cache.meta['tokens']} tokens, k={cache.top_k}, "
        f"{cache.meta['build_tokens_per_second']:.0f} tok/s to build"
    )
    del teacher
    mx.clear_cache()

    mx.random.seed(42)
    student = student_mod.build_student(
        StudentSpec(model=str(model_dir), keep_layers=keep), AdapterSpec(), model_dir, tmp / "out"
    )
    model, acfg = student.model, student.adapter_config
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(
        f"student: {len(model.layers)} of {n_layers} layers (keep {keep[:4]}...), {acfg['fine_tune_type']} "
        f"rank {acfg['lora_parameters']['rank']} scale {acfg['lora_parameters']['scale']} on "
        f"{acfg['num_layers']} layers, {n_trainable / 1e6:.2f}M trainable; batch {args.batch} x {args.seq}"
    )

    split = Split(examples, [CachedTeacher(cache, np.arange(len(examples)))])
    weights = weighting.Weighting([1.0])
    loss_cfg = LossSpec()
    step_tokens = args.batch * args.seq
    cycle = {"i": 0}

    def next_idx():
        idx = batches[cycle["i"] % len(batches)]
        cycle["i"] += 1
        return idx

    # --- candidate: the engine's step (train.Trainer.train_step), on the engine's Trainer
    # (TrainingSpec through train's namespace: the spec import line above is left alone while spec.py moves)
    trainer = train_mod.Trainer(student, split, split, train_mod.TrainingSpec(batch_size=args.batch), weights)
    student_mod.unfreeze_trainable(model, acfg)
    opt_ours = train_mod.make_optimizer(student_mod.apply_param_groups(model, []), 0.0)
    train_mod.set_learning_rate(opt_ours, 1e-4)
    position = train_mod.TrainState()

    def distill_step() -> None:
        trainer.train_step(position, loss_cfg, opt_ours, seed_step=position.step)
        position.step += 1

    # --- baseline: mlx-lm's train() step
    def make_mlx_lm(compiled: bool):
        opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
        student_mod.unfreeze_trainable(model, acfg)
        loss_value_and_grad = nn.value_and_grad(model, default_loss)
        state = [model.state, opt.state, mx.random.state]
        grad_accum_steps = 1

        def step_fn(batch, prev_grad, do_update):
            (lvalue, toks), grad = loss_value_and_grad(model, *batch)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                grad = average_gradients(grad)
                if grad_accum_steps > 1:
                    grad = tree_map(lambda x: x / grad_accum_steps, grad)
                opt.update(model, grad)
                grad = None
            return lvalue, toks, grad

        step = partial(mx.compile, inputs=state, outputs=state)(step_fn) if compiled else step_fn
        model.train()

        def run_step() -> None:
            toks, _ = data_mod.collate([examples[i] for i in next_idx()], pad_id)
            batch = (mx.array(toks), mx.array(np.tile([[0, toks.shape[1] - 1]], (len(toks), 1)).astype(np.int32)))
            losses_, n_tokens = 0, 0
            lvalue, toks_, grad_accum = step(batch, None, True)
            losses_ += lvalue
            n_tokens += toks_
            mx.eval(state, losses_, n_tokens, grad_accum)

        return run_step

    fns = {"mlx_lm_sft": make_mlx_lm(True), "distill_step": distill_step}
    if args.variants == "all":
        fns["mlx_lm_sft_nocompile"] = make_mlx_lm(False)

    print("\ntimed rounds (seconds per optimizer step):")
    rounds = _common.interleaved(fns, args.reps)
    ratios = _common.report(rounds, "mlx_lm_sft", step_tokens)
    clean = rounds.clean()
    mb = _common.median(rounds.of("mlx_lm_sft", clean))
    mc = _common.median(rounds.of("distill_step", clean))

    if not args.no_explore:
        explore(model, split, batches[0], pad_id, weights, loss_cfg, mb)

    print()
    print(_common.load_note())
    extra = "".join(f" {n}={r:.3f}" for n, r in ratios.items() if n not in ("mlx_lm_sft", "distill_step"))
    print(
        f"RESULT name=step_speed ratio={ratios['distill_step']:.3f} baseline={step_tokens / mb:.1f}tok/s "
        f"candidate={step_tokens / mc:.1f}tok/s batch={args.batch}x{args.seq} k={args.k}{extra} "
        f"rounds={len(clean)}/{len(rounds.others)}"
    )


def explore(model, split, idx, pad_id, weights, loss_cfg, step_s: float) -> None:
    """The loss alone: forward + backward w.r.t. fixed student logits, piece by piece."""
    tokens, mask, teachers = split.batch(idx, pad_id, with_teachers=True)
    logits = model(tokens[:, :-1])
    mx.eval(logits)
    logits = mx.array(np.array(logits))  # detached copy
    targets = tokens[:, 1:]
    t = teachers[0]
    print(
        f"\nexplore: loss forward+backward w.r.t. logits {tuple(logits.shape)} (baseline step {step_s * 1000:.0f} ms)"
    )

    def row(name: str, f) -> float:
        g = mx.grad(lambda x: f(x).sum())
        s = _common.micro(lambda: mx.eval(g(logits)), reps=3)
        print(f"  {name:58s} {s * 1000:8.1f} ms  {s / step_s * 100:6.1f}% of the baseline step", flush=True)
        return s

    lens = mx.array(np.tile([[0, logits.shape[1]]], (logits.shape[0], 1)).astype(np.int32))

    def sft_loss(x):
        steps = mx.arange(1, targets.shape[1] + 1)
        m = mx.logical_and(steps >= lens[:, 0:1], steps <= lens[:, 1:])
        return (nn.losses.cross_entropy(x, targets) * m).astype(mx.float32).sum() / m.sum()

    row("mlx-lm default_loss (cross_entropy)", sft_loss)

    def distill(x):
        return losses.distill_loss(x, targets, mask, teachers, weights.weights(tokens, mask, teachers), loss_cfg)[0]

    row("losses.distill_loss (engine)", distill)
    row("  engine student_buckets alone", lambda x: losses.student_buckets(x, t.topk_ids, 1.0))
    row("  mx.logsumexp alone", lambda x: mx.logsumexp(x, axis=-1))
    row("  exp + sum alone", lambda x: mx.exp(x).sum(-1))
    row("  max alone (cheap pass)", lambda x: mx.max(x, axis=-1))

    # The engine's buckets against a float64 NumPy reference.
    print(f"  engine loss {distill(logits).item():.6f}")
    z = np.array(logits).astype(np.float64).reshape(-1, logits.shape[-1])
    ids = np.array(t.topk_ids).astype(np.int64).reshape(len(z), -1)
    mz = z.max(-1, keepdims=True)
    logq = z - (np.log(np.exp(z - mz).sum(-1, keepdims=True)) + mz)
    top = np.take_along_axis(logq, ids, -1)
    rest = logq.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    mr = rest.max(-1, keepdims=True)
    ref = np.concatenate([top, np.log(np.exp(rest - mr).sum(-1, keepdims=True)) + mr], -1)
    sel = np.array(mask).reshape(-1).astype(bool)  # real positions (padding rows hold dummy ids)
    small = sel & (ref[:, -1] < np.log(1e-4))
    got = np.array(losses.student_buckets(logits, t.topk_ids, 1.0)).reshape(ref.shape)
    err = np.abs(got - ref)
    tail_small = f"{err[small, -1].max():.1e}" if small.any() else "n/a"
    print(
        f"  engine buckets vs float64 reference over {sel.sum()} target positions (student tail mass: median "
        f"{np.exp(np.median(ref[sel, -1])):.2e}, min {np.exp(ref[sel, -1].min()):.2e}; {small.sum()} below "
        f"1e-4): max |error| top-k {err[sel, :-1].max():.1e}, tail bucket {err[sel, -1].max():.1e} (where "
        f"tail < 1e-4: {tail_small})"
    )
    # A confident student (logits scaled up): tails of 1e-6 and below.
    sharp = logits * 4.0
    zs = z * 4.0
    ms = zs.max(-1, keepdims=True)
    lq = zs - (np.log(np.exp(zs - ms).sum(-1, keepdims=True)) + ms)
    rs = lq.copy()
    np.put_along_axis(rs, ids, -np.inf, -1)
    mrs = rs.max(-1, keepdims=True)
    ref_tail = np.log(np.exp(rs - mrs).sum(-1)) + mrs[:, 0]
    got_tail = np.array(losses.student_buckets(sharp, t.topk_ids, 1.0)).reshape(ref.shape)[:, -1]
    print(
        f"  a sharper student (logits x 4; tail mass median {np.exp(np.median(ref_tail[sel])):.1e}, "
        f"min {np.exp(ref_tail[sel].min()):.1e}): engine max |tail bucket error| "
        f"{np.abs(got_tail - ref_tail)[sel].max():.1e}"
    )


if __name__ == "__main__":
    main()
