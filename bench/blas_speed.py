"""MLX CPU speed with the wheel's bundled reference BLAS vs OpenBLAS (worker/engine/blas.py), in one run.

    .venv/bin/python bench/blas_speed.py [MODEL_DIR] [--batch 1] [--seq 128] [--seconds 3]

Runs the same work in two fresh interpreters, one with DISTILLERY_BLAS=off (the bare wheel) and one
with `blas.enable()` active, and prints both throughputs and their ratio:
- float32 matmuls of the shapes of a SmolLM2-135M-sized model over batch*seq tokens (GFLOP/s);
- a forward pass of an mlx_lm model over a batch of random tokens (tokens/s): MODEL_DIR if given,
  else a randomly initialised llama shaped like SmolLM2-135M (576 hidden, 30 layers, 49152 vocab).

Everything runs in float32 on the CPU, as the engine does there: OpenBLAS only serves `cblas_sgemm`
(and d/c gemm), so float16/bfloat16 matmuls run in MLX's own CPU kernels and quantized models in its
quantized_matmul, which this change does not touch. The model is cast to float32 before timing.
Linux only (on macOS MLX already uses Accelerate/Metal and `enable()` is a no-op).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOLLM2_135M = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def timed(fn, seconds: float, warmup=None) -> float:
    """Seconds per call: one untimed call of `warmup` (default `fn`), then calls until `seconds` have passed."""
    (warmup or fn)()
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from worker.engine import blas

    described = blas.enable()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    report: dict = {"blas": described, "matmul": []}
    tokens = args.batch * args.seq
    cfg = SMOLLM2_135M
    shapes = [
        (cfg["hidden_size"], cfg["hidden_size"]),
        (cfg["hidden_size"], cfg["intermediate_size"]),
        (cfg["intermediate_size"], cfg["hidden_size"]),
        (cfg["hidden_size"], cfg["vocab_size"]),
    ]
    for k, n in shapes:
        a, b = mx.random.normal((tokens, k)), mx.random.normal((k, n))
        assert a.dtype == b.dtype == mx.float32
        per_call = timed(lambda a=a, b=b: mx.eval(a @ b), args.seconds)
        gflops = 2 * tokens * k * n / per_call / 1e9
        report["matmul"].append({"shape": f"{tokens}x{k} @ {k}x{n}", "gflops": gflops})

    from mlx_lm.utils import _get_classes, load_model

    if args.model:
        model, config = load_model(Path(args.model))
        label = Path(args.model).name
    else:
        config = SMOLLM2_135M
        model_cls, args_cls = _get_classes(config)
        mx.random.seed(0)
        model = model_cls(args_cls.from_dict(config))
        label = "random SmolLM2-135M-shaped llama"
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    inputs = mx.random.randint(0, config["vocab_size"], (args.batch, args.seq))
    assert model(inputs[:, :8]).dtype == mx.float32
    per_pass = timed(lambda: mx.eval(model(inputs)), args.seconds, warmup=lambda: mx.eval(model(inputs[:, :16])))
    label = f"{label}, batch {args.batch}x{args.seq}, float32"
    report["forward"] = {"label": label, "tokens_per_s": tokens / per_pass}
    print(json.dumps(report))


def run(args: argparse.Namespace, blas_off: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_BLAS"}
    if blas_off:
        env["DISTILLERY_BLAS"] = "off"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--seconds",
        str(args.seconds),
    ] + ([args.model] if args.model else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="mlx_lm model folder (default: random SmolLM2-135M-shaped llama)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    bare, fast = run(args, blas_off=True), run(args, blas_off=False)
    print(f"bare:    {bare['blas']}\nenabled: {fast['blas']}\n")
    print(f"{'':38} {'bare':>10} {'enabled':>10} {'ratio':>8}")
    for b, f in zip(bare["matmul"], fast["matmul"]):
        row = f"matmul {b['shape']} GFLOP/s"
        print(f"{row:38} {b['gflops']:10.1f} {f['gflops']:10.1f} {f['gflops'] / b['gflops']:7.1f}x")
    b, f = bare["forward"]["tokens_per_s"], fast["forward"]["tokens_per_s"]
    print(f"{'forward tokens/s':38} {b:10.1f} {f:10.1f} {f / b:7.1f}x")
    print(f"  ({fast['forward']['label']})")


if __name__ == "__main__":
    main()
