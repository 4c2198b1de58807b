"""The engine's training step and forward pass vs PyTorch on the same machine, in one run: the ratios.

    .venv/bin/python bench/peer_speed.py [--model DIR] [--shapes 2x256,4x128,1x512] [--reps 4] [--rounds 2]
                                         [--threads 2] [--k 64] [--quick]

Student: SmolLM2-135M-Instruct keeping every other layer (15 of 30), LoRA rank 16 (scale 20) on every linear
layer, float32 on the CPU. Step: forward KL at T = 1 on the teacher's cached top-k + tail (a cache the engine
builds with the full model over real Shakespeare windows), AdamW, clipping at 1.0.

- distillery: `train.Trainer.train_step`, the step the training loop runs, in this process (OpenBLAS through
  worker.engine.blas, OPENBLAS_NUM_THREADS = --threads).
- pytorch: bench/_torch_peer.py in a bench-only virtual environment (torch 2.13 CPU from the machine's local
  wheel, transformers, peft; never a project dependency), made by this script under
  $XDG_CACHE_HOME/distillery-bench/torch-venv on first use; `torch.set_num_threads(--threads)`. Same tokens,
  same teacher rows (written from the engine's cache), the same sparse loss written in PyTorch.

Forward: the full 30-layer model, logits for every position, no gradient, both sides.

The two sides alternate, --rounds times, each timing --reps steps after a warm-up step; a figure is the median
over every rep of every round. Ratio = distillery tokens/s over pytorch tokens/s (> 1: the engine is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (first: enables OpenBLAS before MLX is imported)
import mlx.core as mx  # noqa: E402
from _common import np  # noqa: E402

from distillery_contract.specs import AdapterSpec, LossSpec, StudentSpec  # noqa: E402
from worker.engine import cache as cache_mod  # noqa: E402
from worker.engine import data as data_mod  # noqa: E402
from worker.engine import models, weighting  # noqa: E402
from worker.engine import student as student_mod  # noqa: E402
from worker.engine import train as train_mod  # noqa: E402
from worker.engine.batches import CachedTeacher, Split  # noqa: E402

TORCH_PINS = ["torch==2.13.0", "transformers>=5,<6", "peft>=0.18,<1", "safetensors", "numpy"]
PEER = Path(__file__).resolve().parent / "_torch_peer.py"


def torch_python() -> Path:
    """The bench-only venv's python, made (pip, the local torch wheel) when missing."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillery-bench" / "torch-venv"
    py = root / "bin" / "python"
    probe = [str(py), "-c", "import torch, transformers, peft; assert torch.__version__.startswith('2.13')"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"making the PyTorch peer's venv in {root} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *TORCH_PINS], check=True)
    subprocess.run(probe, check=True)
    return py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p)
    p.add_argument("--shapes", default=None, help="batch x seq, comma-separated (default 2x256,4x128,1x512)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per side per round (default 4; quick 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=64)
    args = p.parse_args()
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shapes or "2x256,4x128,1x512").split(",")]
    args.reps = args.reps or (2 if args.quick else 4)
    _common.header("peer_speed: the engine's step and forward vs PyTorch, same machine, same run", args)
    print(f"cpu_memory: {_common.reuse_buffers()}  (as training and cache jobs run)")
    _common.run_in_tmp("bench-peer-speed-", run, args)


def run(args, tmp: Path) -> None:
    py = torch_python()
    model_dir = _common.resolve_model(args, tmp)
    teacher, tokenizer, config = models.load_model(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = list(range(0, config["num_hidden_layers"], 2))
    results = []
    for batch, seq in args.shapes:
        results.append(
            one_shape(args, tmp / f"{batch}x{seq}", py, model_dir, teacher, tokenizer, pad_id, keep, batch, seq)
        )
    print(f"\n{'shape':>8} {'what':>8} {'distillery tok/s':>17} {'pytorch tok/s':>14} {'ratio':>6}")
    parts = []
    for (batch, seq), res in zip(args.shapes, results):
        for what, (ours, theirs) in res.items():
            ratio = ours / theirs
            print(f"{batch}x{seq:<6} {what:>8} {ours:17.1f} {theirs:14.1f} {ratio:6.2f}")
            parts.append(f"{what}_{batch}x{seq}={ratio:.3f}")
    print()
    print(_common.load_note())
    print("RESULT name=peer_speed " + " ".join(parts))


def one_shape(args, work: Path, py: Path, model_dir, teacher, tokenizer, pad_id, keep, batch, seq) -> dict:
    work.mkdir(parents=True)
    n_batches = 2
    examples = _common.shakespeare_examples(tokenizer, batch * n_batches, seq, work)[: batch * n_batches]
    cache = cache_mod.build(
        teacher,
        examples,
        work / "cache",
        key="peer",
        top_k=args.k,
        batch_size=4,
        pad_id=pad_id,
        meta={},
        sample_batches=0,
    )
    idx = [np.arange(b * batch, (b + 1) * batch) for b in range(n_batches)]
    arrays: dict[str, np.ndarray] = {"n": np.array(n_batches)}
    for b, ids in enumerate(idx):
        toks, tmask = data_mod.collate([examples[i] for i in ids], pad_id)
        top_ids, top_lp, tail = cache.rows(ids, toks.shape[1])
        arrays.update(
            {
                f"tokens{b}": toks.astype(np.int64),
                f"ids{b}": np.asarray(top_ids).astype(np.int64),
                f"logp{b}": np.asarray(top_lp, dtype=np.float32),
                f"tail{b}": np.asarray(tail, dtype=np.float32),
                f"mask{b}": tmask[:, 1:].astype(np.float32),
            }
        )
    np.savez(work / "batches.npz", **arrays)
    job = {
        "model": str(model_dir),
        "keep_layers": keep,
        "rank": 16,
        "scale": 20.0,
        "threads": args.threads,
        "reps": args.reps,
        "what": ["step", "forward"],
    }
    (work / "job.json").write_text(json.dumps(job))

    # the engine's side
    mx.random.seed(42)
    student = student_mod.build_student(
        StudentSpec(model=str(model_dir), keep_layers=keep), AdapterSpec(), model_dir, work / "out"
    )
    split = Split(examples, [CachedTeacher(cache, np.arange(len(examples)))])
    trainer = train_mod.Trainer(
        student, split, split, train_mod.TrainingSpec(batch_size=batch), weighting.Weighting([1.0])
    )
    student_mod.unfreeze_trainable(student.model, student.adapter_config)
    opt = train_mod.make_optimizer(student_mod.apply_param_groups(student.model, []), 0.0)
    train_mod.set_learning_rate(opt, 1e-4)
    state, loss_cfg = train_mod.TrainState(), LossSpec()

    def our_step() -> None:
        trainer.train_step(state, loss_cfg, opt, seed_step=state.step)
        state.step += 1

    fwd_tokens = [mx.array(arrays[f"tokens{b}"].astype(np.int32)) for b in range(n_batches)]

    def our_forward(b: int) -> None:
        mx.eval(teacher(fwd_tokens[b % n_batches]))

    ours: dict[str, list[float]] = {"step": [], "forward": []}
    theirs: dict[str, list[float]] = {"step": [], "forward": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"\n{batch} x {seq}: cache k={cache.top_k}; rounds of {args.reps} timed steps per side", flush=True)
    for r in range(args.rounds):
        out = subprocess.run([str(py), str(PEER), str(work)], capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("PEER ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"the PyTorch peer failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        peer = json.loads(line[5:])
        theirs["step"] += peer["step_seconds"]
        theirs["forward"] += peer["forward_seconds"]
        our_step()  # warm-up
        ours["step"] += [_common.micro(our_step, reps=1, warmup=0) for _ in range(args.reps)]
        our_forward(0)
        ours["forward"] += [_common.micro(lambda i=i: our_forward(i), reps=1, warmup=0) for i in range(args.reps)]
        print(
            f"  round {r + 1}: step {_common.median(ours['step'][-args.reps :]):.2f} s vs "
            f"{_common.median(theirs['step'][-args.reps :]):.2f} s (pytorch {peer['torch']}, loss "
            f"{peer['step_loss']:.3f}); forward {_common.median(ours['forward'][-args.reps :]):.2f} s vs "
            f"{_common.median(theirs['forward'][-args.reps :]):.2f} s",
            flush=True,
        )
    mx.clear_cache()
    tokens = batch * seq
    return {what: (tokens / _common.median(ours[what]), tokens / _common.median(theirs[what])) for what in ours}


if __name__ == "__main__":
    main()
