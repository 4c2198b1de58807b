"""The demo flow, through the SDK only: a GGUF teacher, a pruned student (24 of its 30 layers), teacher cache
-> SFT and distillation with the same budget -> benchmark, then the adapters downloaded and sampled beside the
teacher and the student before training.

    python demo_flow.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data DIR --out runs/demo [--teacher MLX_DIR]
    (DIR holds train.jsonl, valid.jsonl, test.jsonl; DISTILLERY_BASE_URL / DISTILLERY_API_KEY name the server;
    --teacher, the teacher as an mlx-lm folder, adds the teacher's own sample)

`distillery-server demo` prepares those files from registry packages, starts a local server and runs this.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distillery import Distillery

# Six layers spread through the middle of the 30 go: a capable student (top-1 agreement with the teacher about
# 35% before training) that is 20% smaller, not one so broken that any training helps.
DROPPED_LAYERS = (7, 10, 13, 16, 19, 22)
# Sampling as people run these models (greedy decoding of a small model loops on commas and blank lines).
SAMPLING = {"temp": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 40, "seed": 0}
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"


def run(
    client: Distillery,
    gguf: Path,
    data: Path,
    out: Path,
    *,
    steps: int = 40,
    layers: int = 30,
    progress: bool = True,
    teacher_dir: Path | None = None,
) -> dict:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    teacher = client.models.upload(gguf, name="SmolLM2-135M-Instruct")
    say(f"teacher uploaded: {teacher.id} ({gguf.name})")
    ds = {
        split: client.datasets.upload(data / f"{split}.jsonl", name=f"shakespeare-{split}")
        for split in ("train", "valid", "test")
    }
    say("datasets: " + ", ".join(f"{k} {d.id} ({d.records} records)" for k, d in ds.items()))

    keep = [i for i in range(layers) if i not in DROPPED_LAYERS]
    # the rate is searched (three short trials); distillation and SFT get the same procedure and budget
    training = {
        "steps": steps,
        "batch_size": 4,
        "learning_rate": "auto",
        "lr_search": {"rates": [1e-4, 3e-4, 1e-3], "steps": 3},
        "lr_schedule": "cosine",
        "warmup_steps": max(steps // 20, 1),
        "max_seq_len": 128,
        "seed": 0,
        "eval_every": max(steps // 4, 1),
        "checkpoint_every": steps,
    }

    def distill_spec(alpha: float, evaluate: dict | None = None) -> dict:
        spec = {
            "student": {"model": teacher.id, "keep_layers": keep},
            "teachers": [{"model": teacher.id}],
            "data": {"train": ds["train"].id, "valid": ds["valid"].id},
            "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": alpha, "top_k": 64},
            "adapter": {"type": "lora", "rank": 16, "scale": 20.0},
            "training": training,
        }
        return {"kind": "distill", "spec": spec | ({"evaluate": evaluate} if evaluate else {})}

    cache = client.jobs.create(
        {
            "kind": "teacher_cache",
            "spec": {"teacher": teacher.id, "data": ds["train"].id, "top_k": 64, "max_seq_len": 128},
        }
    )
    say(f"teacher cache job {cache.id}: the teacher's top-64 log-probs over the training text, stored once")
    client.jobs.wait(cache.id, progress=progress)
    sft = client.jobs.create(distill_spec(alpha=0.0))  # plain SFT: the same student, budget and data
    distilled = client.jobs.create(
        distill_spec(
            alpha=1.0,
            evaluate={
                "data": {"text": ds["test"].id},
                "candidates": [{"label": "SFT", "adapter": sft.id}],
                "speed": {"prompt_tokens": 64, "decode_tokens": 32},
            },
        )
    )
    bench = next(client.jobs.list(parent_id=distilled.id))
    say(
        f"SFT job {sft.id}, distill job {distilled.id} ({len(keep)} of {layers} layers, {steps} steps), "
        f"evaluation job {bench.id}"
    )
    for job in (sft, distilled, bench):
        done = client.jobs.wait(job.id, progress=progress)
        final = done.summary.get("final") or {}
        say(
            f"{job.kind} {job.id} succeeded"
            + "".join(
                f", {k} {final[k]:.4g}"
                for k in ("val_kl", "val_ppl", "val_top1_agreement")
                if isinstance(final.get(k), (int, float))
            )
        )

    adapter_dir, sft_dir = out / "distilled", out / "sft"
    not_checkpoints = lambda n: not n.startswith("checkpoints/")  # noqa: E731
    client.artifacts.download(distilled.id, adapter_dir, names=not_checkpoints)
    client.artifacts.download(sft.id, sft_dir, names=not_checkpoints)
    report_dir = out / "report"
    client.artifacts.download(bench.id, report_dir)
    say(
        f"adapters downloaded to {adapter_dir} and {sft_dir} (student model in {adapter_dir / 'student'}); "
        f"report in {report_dir}"
    )
    print_samples(
        {
            "teacher": (teacher_dir, None),
            "student (before)": (adapter_dir / "student", None),
            "SFT": (adapter_dir / "student", sft_dir),
            "distilled": (adapter_dir / "student", adapter_dir),
        }
    )
    print((report_dir / "report.md").read_text())
    say("done")
    return json.loads((report_dir / "report.json").read_text())


def print_samples(models: dict[str, tuple[Path | None, Path | None]]) -> None:
    """One sample per model from the same prompt and seed, with the sampling settings above, as mlx-lm runs it."""
    try:
        import mlx.core as mx
        from mlx_lm import generate, load
        from mlx_lm.sample_utils import make_logits_processors, make_sampler
    except ImportError:
        print("(mlx_lm is not installed here: no samples)")
        return
    cfg = SAMPLING
    print(
        f"\nsamples (temperature {cfg['temp']}, top-p {cfg['top_p']}, repetition penalty "
        f"{cfg['repetition_penalty']}, {cfg['max_tokens']} tokens, seed {cfg['seed']}):"
    )
    for label, (model_dir, adapter) in models.items():
        if model_dir is None:
            continue
        model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
        mx.random.seed(cfg["seed"])
        text = generate(
            model,
            tokenizer,
            prompt=PROMPT,
            max_tokens=cfg["max_tokens"],
            sampler=make_sampler(temp=cfg["temp"], top_p=cfg["top_p"]),
            logits_processors=make_logits_processors(repetition_penalty=cfg["repetition_penalty"]),
        )
        body = "\n    ".join((PROMPT + text).strip().splitlines())
        print(f"\n--- {label}\n    {body}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with train/valid/test.jsonl")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--teacher", type=Path, default=None, help="the teacher as an mlx-lm folder, for its sample")
    args = p.parse_args()
    with Distillery() as client:
        run(client, args.gguf, args.data, args.out, steps=args.steps, teacher_dir=args.teacher)


if __name__ == "__main__":
    main()
