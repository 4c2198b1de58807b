"""Offline distillation training step vs mlx-lm's own LoRA SFT step, same student and batch, in one run.

    .venv/bin/python bench/step_speed.py [--model DIR] [--batch 4] [--seq 128] [--k 64] [--reps 8]
                                         [--variants all|main] [--no-explore] [--quick]

Student: `student.build_student` with keep_layers = every other layer (SmolLM2-135M: 15 of 30) and the
default adapter (LoRA rank 16, scale 20, all linear layers of all kept layers), float32 on CPU
(models.load_model). One student serves every variant (same weights, same LoRA layers).

Baseline ("mlx_lm_sft"): mlx-lm's training step as mlx_lm/tuner/trainer.py's train() builds it:
nn.value_and_grad over mlx_lm.tuner.trainer.default_loss, the step wrapped in
mx.compile(inputs=state, outputs=state) with state = [model.state, optimizer.state, mx.random.state],
AdamW update inside, then mx.eval(state, losses, n_tokens, grad_accum). No clipping (mlx-lm has none).

Candidate ("distill_step"): worker/engine/train.py's step, replicated line by line (train.py's step is
inline in train(), not a function): Split.batch (reads the top-k rows from a TeacherCache built by
cache.build with the full teacher over the same examples, k=64), value_and_grad of
losses.distill_loss (SparseTeacher, LossSpec defaults: forward KL, T=1, alpha=1), mx.eval of loss, ntok
and grads, .item()s, clip_grad_norm(1.0), AdamW update, mx.eval(model.parameters(), optimizer.state).

Other variants timed in the same alternating rounds (with --variants all, the default), each our step
with losses.student_buckets monkeypatched or the step compiled:
  mlx_lm_sft_nocompile   the baseline without mx.compile (what compile is worth to mlx-lm)
  distill_compiled       our step inside mx.compile(inputs=state, outputs=state), clipping included
  distill_before         student_buckets as before commit e00ceb2 (log_softmax, put_along_axis, a second
                         logsumexp over the rest): what the change bought
  distill_exact_tail     an alternative student_buckets with one exp pass that keeps the tail exact for tiny
                         tails (logsumexp of the masked rest, shifted by its max; see student_buckets_exact_tail)

Tokens/s counts batch x seq tokens per step for every variant (the same batch), so ratios are time ratios.
Rounds alternate the variants' order; medians are over the rounds during which other processes used
< 0.15 cores (/proc/stat), or over all rounds when fewer than 3 are clean.
The explore section times the loss alone (forward+backward w.r.t. fixed logits) piece by piece.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (first: enables OpenBLAS before MLX is imported)
from _common import np  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.nn.utils import average_gradients  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402

from worker.engine import cache as cache_mod  # noqa: E402
from worker.engine import data as data_mod  # noqa: E402
from worker.engine import losses, models  # noqa: E402
from worker.engine import student as student_mod  # noqa: E402
from worker.engine import train as train_mod  # noqa: E402
from worker.engine.batches import CachedTeacher, Split  # noqa: E402
from worker.engine.spec import AdapterSpec, LossSpec, StudentSpec  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Other student_buckets, for comparison with the engine's (losses.student_buckets).


def student_buckets_before(student_logits: mx.array, topk_ids: mx.array, temperature: float) -> mx.array:
    """losses.student_buckets as it was before commit e00ceb2."""
    log_q = losses.log_softmax_t(student_logits, temperature)
    ids = topk_ids.astype(mx.int32)
    top = mx.take_along_axis(log_q, ids, axis=-1)
    rest = mx.put_along_axis(log_q, ids, mx.array(-1e30, dtype=mx.float32), axis=-1)
    tail = mx.logsumexp(rest, axis=-1, keepdims=True)
    return mx.concatenate([top, tail], axis=-1)


def student_buckets_exact_tail(student_logits: mx.array, topk_ids: mx.array, temperature: float) -> mx.array:
    """[log q at the top-k ids, log q of the rest] from one exp pass, the tail exact however small.

    The engine's version (since e00ceb2) takes the tail as log(1 − Σ q_topk): one logsumexp over V (an exp
    pass forward and another in its backward), but a tail mass below ~1e-6 is resolved coarsely. Here:
    mask the top-k logits out (put_along_axis), shift by the max of the rest (so the rest's sum is >= 1: no
    underflow however small q_tail is), one exp + sum for the rest, and normalise with a logsumexp over the
    k + 1 small terms. exp's backward reuses its output, so no pass over V recomputes an exp; the extra
    cost is a put_along_axis copy and a max pass (cheap: no transcendental).
    """
    z = student_logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    ids = topk_ids.astype(mx.int32)
    top = mx.take_along_axis(z, ids, axis=-1)                                      # [..., k]
    rest = mx.put_along_axis(z, ids, mx.array(-1e30, dtype=mx.float32), axis=-1)    # top-k masked out
    m = mx.stop_gradient(mx.max(rest, axis=-1, keepdims=True))
    log_rest = m + mx.log(mx.sum(mx.exp(rest - m), axis=-1, keepdims=True))        # [..., 1]
    buckets = mx.concatenate([top, log_rest], axis=-1)
    return buckets - mx.logsumexp(buckets, axis=-1, keepdims=True)


class patched:
    """Context manager: losses.student_buckets replaced by `fn`."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        self.original = losses.student_buckets
        losses.student_buckets = self.fn

    def __exit__(self, *exc):
        losses.student_buckets = self.original


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="tokens per example (default 128; quick 32)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--distinct-batches", type=int, default=4, help="batches cycled through (cache covers them)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 8; quick 2)")
    p.add_argument("--variants", choices=("all", "main"), default="all")
    p.add_argument("--no-explore", action="store_true")
    args = p.parse_args()
    args.seq = args.seq or (32 if args.quick else 128)
    args.reps = args.reps or (2 if args.quick else 8)
    _common.header("step_speed: offline distillation step vs mlx-lm LoRA SFT step", args)
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
    cache = cache_mod.build(teacher, examples, tmp / "cache", key="bench", top_k=args.k, batch_size=8,
                            pad_id=pad_id, meta={}, sample_batches=0)
    print(f"teacher cache: {cache.meta['tokens']} tokens, k={cache.top_k}, "
          f"{cache.meta['build_tokens_per_second']:.0f} tok/s to build")
    del teacher
    mx.clear_cache()

    mx.random.seed(42)
    student = student_mod.build_student(StudentSpec(model=str(model_dir), keep_layers=keep), AdapterSpec(),
                                        model_dir, tmp / "out")
    model, acfg = student.model, student.adapter_config
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"student: {len(model.layers)} of {n_layers} layers (keep {keep[:4]}...), {acfg['fine_tune_type']} "
          f"rank {acfg['lora_parameters']['rank']} scale {acfg['lora_parameters']['scale']} on "
          f"{acfg['num_layers']} layers, {n_trainable / 1e6:.2f}M trainable; batch {args.batch} x {args.seq}")

    split = Split(examples, [CachedTeacher(cache, np.arange(len(examples)))])
    weights = losses.FixedWeights([1.0])
    loss_cfg = LossSpec()
    step_tokens = args.batch * args.seq
    cycle = {"i": 0}

    def next_idx():
        idx = batches[cycle["i"] % len(batches)]
        cycle["i"] += 1
        return idx

    # --- candidate: train.py's step (grad_accum = 1, max_grad_norm = 1.0), replicated
    def loss_fn(model, tokens, mask, teachers, loss_cfg):
        logits = model(tokens[:, :-1])
        return losses.distill_loss(logits, tokens[:, 1:], mask, teachers, weights, loss_cfg)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def new_optimizer():
        student_mod.unfreeze_trainable(model, acfg)
        opt = train_mod.make_optimizer(student_mod.apply_param_groups(model, []), 0.0)
        train_mod.set_learning_rate(opt, 1e-4)
        return opt

    opt_ours = new_optimizer()

    def distill_step() -> None:
        mx.random.seed(42 * 1_000_003 + cycle["i"])
        grads, loss_sum, ntoks = None, 0.0, 0
        idx = next_idx()
        tokens, mask, teachers = split.batch(idx, pad_id, with_teachers=True)
        (loss, ntok), g = loss_and_grad(model, tokens, mask, teachers, loss_cfg)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, ntok, grads)
        loss_sum += loss.item()
        ntoks += int(ntok.item())
        grads, grad_norm = optim.clip_grad_norm(grads, 1.0)
        opt_ours.update(model, grads)
        mx.eval(model.parameters(), opt_ours.state)
        float(grad_norm.item())

    def with_buckets(fn):
        def step() -> None:
            with patched(fn):
                distill_step()
        return step

    # --- our step compiled the way mlx-lm compiles its step (teacher rows as inputs)
    def make_compiled():
        opt = new_optimizer()
        state = [model.state, opt.state, mx.random.state]

        def inner(tokens, mask, ids, lps, tail):
            teachers = [losses.SparseTeacher(ids, lps, tail, cache.vocab_size)]
            (loss, ntok), grads = loss_and_grad(model, tokens, mask, teachers, loss_cfg)
            grads, grad_norm = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            return loss, ntok, grad_norm

        compiled = mx.compile(inner, inputs=state, outputs=state)

        def step() -> None:
            tokens, mask, teachers = split.batch(next_idx(), pad_id, with_teachers=True)
            t = teachers[0]
            out = compiled(tokens, mask, t.topk_ids, t.topk_logprobs, t.tail_logmass)
            mx.eval(state, *out)
            out[0].item(), out[1].item(), out[2].item()

        return step

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
        fns.update({"mlx_lm_sft_nocompile": make_mlx_lm(False), "distill_compiled": make_compiled(),
                    "distill_before": with_buckets(student_buckets_before),
                    "distill_exact_tail": with_buckets(student_buckets_exact_tail)})

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
    print(f"RESULT name=step_speed ratio={ratios['distill_step']:.3f} baseline={step_tokens / mb:.1f}tok/s "
          f"candidate={step_tokens / mc:.1f}tok/s batch={args.batch}x{args.seq} k={args.k}{extra} "
          f"rounds={len(clean)}/{len(rounds.others)}")


def explore(model, split, idx, pad_id, weights, loss_cfg, step_s: float) -> None:
    """The loss alone: forward + backward w.r.t. fixed student logits, piece by piece."""
    tokens, mask, teachers = split.batch(idx, pad_id, with_teachers=True)
    logits = model(tokens[:, :-1])
    mx.eval(logits)
    logits = mx.array(np.array(logits))  # detached copy
    targets = tokens[:, 1:]
    t = teachers[0]
    print(f"\nexplore: loss forward+backward w.r.t. logits {tuple(logits.shape)} "
          f"(baseline step {step_s * 1000:.0f} ms)")

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
        return losses.distill_loss(x, targets, mask, teachers, weights, loss_cfg)[0]

    row("losses.distill_loss (engine)", distill)
    for name, fn in (("before e00ceb2", student_buckets_before), ("exact-tail alternative", student_buckets_exact_tail)):
        with patched(fn):
            row(f"  ... with student_buckets {name}", distill)
    row("  engine student_buckets alone", lambda x: losses.student_buckets(x, t.topk_ids, 1.0))
    row("  student_buckets before e00ceb2 alone", lambda x: student_buckets_before(x, t.topk_ids, 1.0))
    row("  exact-tail student_buckets alone", lambda x: student_buckets_exact_tail(x, t.topk_ids, 1.0))
    row("  mx.logsumexp alone", lambda x: mx.logsumexp(x, axis=-1))
    row("  exp + sum alone", lambda x: mx.exp(x).sum(-1))
    row("  max alone (cheap pass)", lambda x: mx.max(x, axis=-1))

    # Loss and gradient of the variants, and the buckets against a float64 NumPy reference.
    grads = {}
    for name, fn in (("engine", losses.student_buckets), ("before", student_buckets_before),
                     ("exact_tail", student_buckets_exact_tail)):
        with patched(fn):
            grads[name] = (distill(logits).item(), mx.grad(distill)(logits))
    ga = grads["before"][1]
    print("  loss / max |grad - before's grad| (max |grad| "
          f"{mx.abs(ga).max().item():.2e}): " + ", ".join(
              f"{n} {v:.6f} / {mx.abs(g - ga).max().item():.1e}" for n, (v, g) in grads.items()))
    z = np.array(logits).astype(np.float64).reshape(-1, logits.shape[-1])
    ids = np.array(t.topk_ids).astype(np.int64).reshape(len(z), -1)
    mz = z.max(-1, keepdims=True)
    logq = z - (np.log(np.exp(z - mz).sum(-1, keepdims=True)) + mz)
    top = np.take_along_axis(logq, ids, -1)
    rest = logq.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    mr = rest.max(-1, keepdims=True)
    ref = np.concatenate([top, np.log(np.exp(rest - mr).sum(-1, keepdims=True)) + mr], -1)
    sel = np.array(mask).reshape(-1).astype(bool)   # real positions (padding rows hold dummy ids)
    small = sel & (ref[:, -1] < np.log(1e-4))
    print(f"  buckets vs float64 reference over {sel.sum()} target positions (student tail mass: median "
          f"{np.exp(np.median(ref[sel, -1])):.2e}, min {np.exp(ref[sel, -1].min()):.2e}; {small.sum()} below 1e-4):")
    for name, fn in (("engine", losses.student_buckets), ("before", student_buckets_before),
                     ("exact_tail", student_buckets_exact_tail)):
        got = np.array(fn(logits, t.topk_ids, 1.0)).reshape(ref.shape)
        err = np.abs(got - ref)
        tail_small = f"{err[small, -1].max():.1e}" if small.any() else "n/a"
        print(f"    {name:10s} max |error| top-k {err[sel, :-1].max():.1e}, tail bucket {err[sel, -1].max():.1e} "
              f"(where tail < 1e-4: {tail_small})")
    # A confident student (logits scaled up): tails of 1e-6 and below, where log(1 - Σ q_topk) is coarse.
    sharp = logits * 4.0
    zs = z * 4.0
    ms = zs.max(-1, keepdims=True)
    lq = zs - (np.log(np.exp(zs - ms).sum(-1, keepdims=True)) + ms)
    rs = lq.copy()
    np.put_along_axis(rs, ids, -np.inf, -1)
    mrs = rs.max(-1, keepdims=True)
    ref_tail = (np.log(np.exp(rs - mrs).sum(-1)) + mrs[:, 0])
    print(f"  a sharper student (logits x 4; tail mass median {np.exp(np.median(ref_tail[sel])):.1e}, "
          f"min {np.exp(ref_tail[sel].min()):.1e}): max |tail bucket error| " + ", ".join(
              f"{name} {np.abs(np.array(fn(sharp, t.topk_ids, 1.0)).reshape(ref.shape)[:, -1] - ref_tail)[sel].max():.1e}"
              for name, fn in (("engine", losses.student_buckets), ("before", student_buckets_before),
                               ("exact_tail", student_buckets_exact_tail))))

if __name__ == "__main__":
    main()
