"""`distillery-server demo`: the real thing on a laptop-sized budget.

SmolLM2-135M-Instruct (imported from its GGUF) teaches a student that keeps every other layer, on real
Shakespeare. The same student is also trained by plain SFT (alpha = 0) for the same number of steps; both
are scored on a held-out play against the teacher: KL, top-1 agreement and perplexity, before and after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from worker import realdata


def run_demo(work: Path, steps: int = 60, batch_size: int = 4, max_seq_len: int = 128, train_records: int = 320,
             learning_rate: float = 2e-4) -> dict:
    from mlx_lm import generate

    from worker.engine import data as data_mod
    from worker.engine import distill, losses, models
    from worker.engine.batches import CachedTeacher, Split
    from worker.engine.cache import CacheStore
    from worker.engine.evaluate import evaluate
    from worker.engine.spec import DistillSpec
    from worker.engine.train import Hooks

    t0 = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)  # noqa: E731
    teacher = realdata.smollm2_model()
    say(f"teacher: SmolLM2-135M-Instruct imported from GGUF at {teacher}")
    paths = realdata.shakespeare_splits(work / "data", train=train_records, valid=24, test=48)
    say(f"data: Shakespeare, {train_records} training passages; valid = Hamlet, test = The Tempest")
    store = CacheStore(realdata.cache_root() / "teacher-caches")
    layers = json.loads((teacher / "config.json").read_text())["num_hidden_layers"]
    keep = list(range(0, layers, 2))

    def spec(alpha: float) -> DistillSpec:
        return DistillSpec.model_validate({
            "student": {"model": str(teacher), "keep_layers": keep},
            "teachers": [{"model": str(teacher)}],
            "data": {"train": str(paths["train"]), "valid": str(paths["valid"])},
            "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": alpha, "top_k": 64},
            "adapter": {"type": "lora", "rank": 16, "scale": 20.0, "layers": -1},
            "training": {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                         "lr_schedule": "cosine", "warmup_steps": max(steps // 20, 1), "max_seq_len": max_seq_len,
                         "seed": 0, "eval_every": max(steps // 3, 1), "checkpoint_every": steps},
        })

    def progress(r: dict) -> None:
        if r["step"] % 10 == 0 or r["step"] == r["total_steps"]:
            say(f"  step {r['step']}/{r['total_steps']} loss {r['loss']:.3f} {r['tokens_per_second']:.0f} tok/s "
                f"eta {r['eta_seconds']:.0f}s")

    hooks = Hooks(on_event=lambda kind, msg, data: say(f"  [{kind}] {msg}") if kind != "cache_progress" else None)
    runs = {}
    for label, alpha in (("distilled", 1.0), ("sft", 0.0)):
        say(f"training the {label} student ({len(keep)} of {layers} layers, {steps} steps, alpha={alpha})")
        inputs = distill.Inputs(student=teacher, teachers=[teacher], train=paths["train"], valid=paths["valid"])
        runs[label] = work / label
        distill.run_distill(spec(alpha), inputs, runs[label], store, hooks, on_progress=progress)

    say("scoring on the held-out play")
    tokenizer = models.load_tokenizer(teacher)
    test_ds = data_mod.load_jsonl(paths["test"])
    test_ex = data_mod.tokenize(test_ds, tokenizer, max_seq_len)
    test_cache = distill.ensure_cache(teacher, test_ds, test_ex, tokenizer, top_k=64, max_seq_len=max_seq_len,
                                      store=store, hooks=hooks)
    split = Split(test_ex, [CachedTeacher(test_cache, np.arange(len(test_ex)))])
    student_dir = runs["distilled"] / "student"
    candidates = {"teacher (30 layers)": (teacher, None), f"student before ({len(keep)} layers)": (student_dir, None),
                  "student + distillation": (student_dir, runs["distilled"]), "student + SFT": (student_dir, runs["sft"])}
    rows = {}
    for label, (model_dir, adapter) in candidates.items():
        model, tok, _ = models.load_model(model_dir)
        if adapter is not None:
            from mlx_lm.tuner.utils import load_adapters

            load_adapters(model, str(adapter))
        rows[label] = evaluate(model, split, losses.FixedWeights([1.0]), 8, tok.pad_token_id or 0)
        if adapter == runs["distilled"]:
            sample = generate(model, tok, prompt="ROMEO.\nBut soft, what light", max_tokens=40)
    table = _table(rows)
    print(table)
    print(f"\nsample from the distilled student: ROMEO.\\nBut soft, what light{sample!r}")
    say(f"done in {time.perf_counter() - t0:.0f}s; adapter: {runs['distilled']} (loads onto {student_dir})")
    return rows


def _table(rows: dict[str, dict]) -> str:
    head = f"{'model':28} {'test KL':>9} {'top-1 agree':>12} {'top-5 agree':>12} {'perplexity':>11}"
    lines = [head, "-" * len(head)]
    for label, r in rows.items():
        lines.append(f"{label:28} {r['val_kl']:9.4f} {r['val_top1_agreement']:12.3f} "
                     f"{r['val_top5_agreement']:12.3f} {r['val_ppl']:11.2f}")
    return "\n".join(lines)
