"""The benchmark job's cost: wall time and memory of `run_benchmark` on a reference and three candidates.

    .venv/bin/python bench/benchmark_cost.py [--model DIR] [--texts 16] [--seq 128] [--mcq 8] [--pairs 8]
                                             [--batch 4] [--runs 1] [--quick] [--against REV]

Reference: SmolLM2-135M-Instruct (service.commands.realdata.smollm2_model()). Candidates: the reference with
2 middle layers removed, with 4 removed (models.prune_layers, saved as mlx-lm folders in the source's dtype),
and the reference with a random LoRA adapter (rank 8 on every layer, B drawn non-zero: a fresh LoRA is the
identity). Data, all real Shakespeare text (realdata): --texts passages of `text` (windows of --seq tokens,
The Tempest excluded), --mcq questions from The Tempest (a line; the choices its true next line and the next
lines of three other speeches) and --pairs preference pairs (chosen: the true next line, rejected: another
speech's). Speed phase off. --quick: a tiny random 6-layer llama (tests/helpers/tiny.py) instead, seconds.

The inputs are made once, by this tree's code, before any run. A run is `run_benchmark` (what the worker's
benchmark job calls) alone in a fresh interpreter, --runs times. Per run: wall seconds of `run_benchmark`,
the process's peak RSS (VmHWM of /proc/self/status at the end; not ru_maxrss, which Linux carries over from
the parent's image across exec, so it would count the models the inputs were made with) and MLX's peak
memory (mx.get_peak_memory at the end), and
per model the seconds of `models.load_model` plus those of its forward passes (each call of the model is
evaluated on return, so that time is the model's own, not the metrics'). `rest_s` is the wall time outside
them: pre-flight, the metrics against the reference, the reference store, the report. Each candidate's KL
is printed too, to show both sides measure the same thing. Figures are medians over the runs.

`--against REV` runs this script (this tree's copy) on this tree's engine and on REV's (a temporary git
worktree; bench/_common.py, run_against), the same inputs on both sides, and prints this tree's RESULT figures
over REV's. The script reaches the engine only through names both layouts have (`benchmark.run_benchmark`,
`BenchmarkSpec`, `BenchmarkInputs`, `CandidateInput`, `models.load_model`), so it runs against ea54370~1, the
last revision that kept every model of a benchmark loaded at once, and anything after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (first: enables OpenBLAS before MLX is imported)

INPUTS_ENV = "DISTILLERY_BENCH_COST_INPUTS"  # the folder of inputs made once, for every run on both sides
SCRIPT = Path(__file__).resolve()
MB = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p)
    _common.add_against_args(p)
    p.add_argument("--texts", type=int, default=None, help="text passages (default 16; quick 8)")
    p.add_argument("--seq", type=int, default=None, help="max_seq_len (default 128; quick 32)")
    p.add_argument("--mcq", type=int, default=None, help="multiple-choice questions of 4 choices (default 8; quick 4)")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs (default 8; quick 4)")
    p.add_argument("--batch", type=int, default=4, help="the spec's batch_size")
    p.add_argument("--runs", type=int, default=1, help="runs of run_benchmark, each in a fresh interpreter")
    p.add_argument("--run-one", type=Path, default=None, help=argparse.SUPPRESS)  # internal: the measured process
    args = p.parse_args()
    if args.run_one is not None:
        return run_one(args.run_one)
    q = args.quick
    args.texts = args.texts or (8 if q else 16)
    args.seq = args.seq or (32 if q else 128)
    args.mcq = args.mcq or (4 if q else 8)
    args.pairs = args.pairs or (4 if q else 8)
    _common.header("benchmark_cost: run_benchmark's wall time and memory, reference + 3 candidates", args)
    if os.environ.get(INPUTS_ENV):  # a run that run_against started: the inputs are made
        return measure(args, Path(os.environ[INPUTS_ENV]))
    _common.run_in_tmp("bench-benchmark-cost-", prepare_and_run, args)


def prepare_and_run(args, tmp: Path) -> None:
    inputs = tmp / "inputs"
    t0 = time.perf_counter()
    write_inputs(args, inputs, tmp)
    print(f"inputs made in {time.perf_counter() - t0:.1f} s: {inputs}", flush=True)
    os.environ[INPUTS_ENV] = str(inputs)  # inherited by the runs run_against starts
    if args.against:
        return _common.run_against(args.against, args.against_runs)
    measure(args, inputs)


# ------------------------------------------------------------------------------------------- the inputs


def write_inputs(args, folder: Path, tmp: Path) -> None:
    """Models, adapter and data files, and `spec.json`: the spec document with local paths."""
    ref = _common.tiny_models(tmp / "quick-model", layers=6) if args.quick and not args.model else None
    ref = ref or _common.resolve_model(args, tmp)
    folder.mkdir(parents=True)
    candidates = [
        {"label": "drop2", "model": str(pruned(ref, 2, folder / "drop2"))},
        {"label": "drop4", "model": str(pruned(ref, 4, folder / "drop4"))},
        {"label": "lora", "model": str(ref), "adapter": str(random_lora(ref, folder / "lora"))},
    ]
    data = write_data(args, folder)
    spec = {
        "reference": str(ref),
        "candidates": candidates,
        "data": {k: str(v) for k, v in data.items()},
        "max_seq_len": args.seq,
        "batch_size": args.batch,
        "speed": {"enabled": False},
    }
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    print(f"reference: {ref}")
    print(f"candidates: {', '.join(c['label'] for c in candidates)}; data: {', '.join(data)}")


def pruned(ref: Path, drop: int, out: Path) -> Path:
    """`ref` without `drop` of its middle layers, saved as an mlx-lm folder in the source's dtype."""
    from worker.engine import models

    model, _, config = models.load_model(ref)
    n = len(model.layers)
    gone = set(range(n // 2 - drop // 2, n // 2 - drop // 2 + drop))
    config = models.prune_layers(model, config, [i for i in range(n) if i not in gone])
    return models.save_model_folder(out, model, config, ref, dtype=models.source_dtype(ref))


def random_lora(ref: Path, out: Path, rank: int = 8) -> Path:
    """A LoRA adapter on every layer of `ref` in mlx-lm's format, its B matrices random (seeded)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from worker.engine import models

    model, _, _ = models.load_model(ref)
    model.freeze()
    params = {"rank": rank, "scale": 10.0, "dropout": 0.0}
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), params)
    weights = {
        k: (0.02 * mx.random.normal(v.shape) if k.endswith("lora_b") else v)
        for k, v in tree_flatten(model.parameters())
        if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def write_data(args, folder: Path) -> dict[str, Path]:
    """text.jsonl (passages of the other plays), mcq.jsonl and preference.jsonl (lines of The Tempest)."""
    from service.commands.realdata import passages, shakespeare_splits, shakespeare_texts

    split = shakespeare_splits(folder / "shakespeare", train=args.texts, valid=1, test=1, max_chars=args.seq * 3)
    pairs = next_lines(passages(shakespeare_texts()["tempest"], 2000)[10:], max(args.mcq, args.pairs) + 3)
    mcq = []
    for i in range(args.mcq):
        others = [pairs[(i + j) % len(pairs)][1] for j in (1, 2, 3)]
        answer = i % 4
        mcq.append(
            {"question": pairs[i][0], "choices": others[:answer] + [pairs[i][1]] + others[answer:], "answer": answer}
        )
    pref = [{"prompt": a, "chosen": b, "rejected": pairs[i + 1][1]} for i, (a, b) in enumerate(pairs[: args.pairs])]
    paths = {"text": split["train"], "mcq": folder / "mcq.jsonl", "preference": folder / "preference.jsonl"}
    for slot, records in (("mcq", mcq), ("preference", pref)):
        paths[slot].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def next_lines(speeches: list[str], n: int) -> list[tuple[str, str]]:
    """(a line, the line after it) from `n` different speeches, both lines at least 20 characters long."""
    out = []
    for speech in speeches:
        lines = [line.strip() for line in speech.splitlines() if len(line.strip()) >= 20]
        if len(lines) >= 2 and lines[0] != lines[1]:
            out.append((lines[0], lines[1]))
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} speeches with two lines, wanted {n}")


# ------------------------------------------------------------------------------------- the measured run


def measure(args, inputs: Path) -> None:
    """`run_benchmark` in --runs fresh interpreters; a table per run and the medians as the RESULT line."""
    print(f"engine: {_common.REPO}")
    runs = [run_child(inputs) for _ in range(args.runs)]
    labels = list(runs[0]["models"])
    result = {
        "wall": median(r["wall_s"] for r in runs),
        "peak_rss": median(r["peak_rss_mb"] for r in runs),
        "mlx_peak": median(r["mlx_peak_mb"] for r in runs),
        "base_rss": median(r["base_rss_mb"] for r in runs),
        "models": median(sum(model_seconds(m) for m in r["models"].values()) for r in runs),
    }
    result["rest"] = result["wall"] - result["models"]
    per_model = {label: median(model_seconds(r["models"][label]) for r in runs) for label in labels}
    kl = {label: median(r["kl"][label] for r in runs) for label in labels if label in runs[0]["kl"]}
    print()
    print(_common.load_note())
    units = {"wall": "s", "models": "s", "rest": "s", "peak_rss": "MB", "mlx_peak": "MB", "base_rss": "MB"}
    figures = [f"{k}={v:.4g}{units[k]}" for k, v in result.items()]
    figures += [f"{k}={v:.4g}s" for k, v in per_model.items()]
    figures += [f"kl_{k}={v:.6g}" for k, v in kl.items() if k != "reference"]
    print("RESULT name=benchmark_cost " + " ".join(figures))


def model_seconds(m: dict) -> float:
    return m["load_s"] + m["forward_s"]


def median(xs) -> float:
    return statistics.median(list(xs))


def run_child(inputs: Path) -> dict:
    """One `--run-one` process: its MEASURED figures, its peak RSS from wait4; prints a table of them."""
    with tempfile.TemporaryDirectory(prefix="bench-benchmark-cost-run-") as out:
        cmd = [sys.executable, str(SCRIPT), "--run-one", str(inputs)]
        proc = subprocess.Popen(cmd, cwd=out, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines = proc.stdout.read().splitlines()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    measured = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("MEASURED ")]
    if proc.returncode or not measured:
        print("\n".join(lines[-20:]))
        raise SystemExit(f"the measured run failed (exit status {proc.returncode})")
    run = {**measured[0], "ru_maxrss_mb": usage.ru_maxrss * 1024 / MB}  # Linux: ru_maxrss in KiB
    print_run(run)
    return run


def print_run(run: dict) -> None:
    print(
        f"\nrun: wall {run['wall_s']:.2f} s, peak RSS {run['peak_rss_mb']:.0f} MB (at the start of run_benchmark "
        f"{run['base_rss_mb']:.0f} MB; wait4's ru_maxrss {run['ru_maxrss_mb']:.0f} MB), MLX peak {run['mlx_peak_mb']:.0f} MB; "
        f"{run['data']}"
    )
    print(f"  {'model':10} {'load s':>8} {'forward s':>10} {'kl':>10} {'top1':>7}")
    for label, m in run["models"].items():
        kl, top1 = run["kl"].get(label, float("nan")), run["top1"].get(label, float("nan"))
        print(f"  {label:10} {m['load_s']:8.2f} {m['forward_s']:10.2f} {kl:10.5f} {top1:7.3f}")
    sys.stdout.flush()


# --------------------------------------------------------------------------- inside the measured process


def run_one(inputs: Path) -> None:
    """`run_benchmark` of inputs/spec.json, each model's load and forward passes timed; prints MEASURED json."""
    import mlx.core as mx

    from worker.engine import benchmark as bm
    from worker.engine import models

    doc = json.loads((inputs / "spec.json").read_text())
    labels = ["reference", *(c["label"] for c in doc["candidates"])]
    clock = ModelClock(labels)
    clock.install(models)
    spec = bm.BenchmarkSpec.model_validate(doc)  # the class the revision's benchmark module itself uses
    bench_inputs = bm.BenchmarkInputs(
        reference=Path(doc["reference"]),
        candidates=[
            bm.CandidateInput(c["label"], Path(c["model"]), _path(c.get("adapter"))) for c in doc["candidates"]
        ],
        **{slot: Path(path) for slot, path in doc["data"].items()},
    )
    out = Path.cwd() / "report"
    base_rss = vm_hwm_mb()
    t0 = time.perf_counter()
    summary = bm.run_benchmark(spec, bench_inputs, out)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r["metrics"] for r in report["candidates"]}
    measured = {
        "wall_s": wall,
        "mlx_peak_mb": mx.get_peak_memory() / MB,
        "base_rss_mb": base_rss,
        "peak_rss_mb": vm_hwm_mb(),
        "models": {label: {"load_s": clock.load[label], "forward_s": clock.forward[label]} for label in clock.load},
        "kl": {label: m["kl"] for label, m in rows.items() if "kl" in m},
        "top1": {label: m["top1_agreement"] for label, m in rows.items() if "top1_agreement" in m},
        "data": data_note(report),
        "reference": summary["reference"],
    }
    print("MEASURED " + json.dumps(measured), flush=True)


def vm_hwm_mb() -> float:
    """This process's peak resident set size so far (since its exec), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def data_note(report: dict) -> str:
    d = report["data"]
    tokens = next(iter(r["metrics"].get("tokens", 0) for r in report["candidates"]))
    return (
        f"{d['text']['sequences']} text sequences ({tokens} target tokens), {d['mcq']['records']} questions, "
        f"{d['preference']['records']} pairs"
    )


class ModelClock:
    """Seconds of each model's `models.load_model` and of its forward passes; the i-th load is labels[i]
    (both the revisions this script runs against load the reference first, then the candidates in order)."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.load: dict[str, float] = {}
        self.forward: dict[str, float] = {}

    def install(self, models_module) -> None:
        original = models_module.load_model

        def load_model(path, **kw):
            i = len(self.load)
            label = self.labels[i] if i < len(self.labels) else f"load{i}"
            t0 = time.perf_counter()
            model, tokenizer, config = original(path, **kw)
            self.load[label] = time.perf_counter() - t0
            self.forward[label] = 0.0
            self.time_calls(model, label)
            return model, tokenizer, config

        models_module.load_model = load_model

    def time_calls(self, model, label: str) -> None:
        """The model's class swapped for a subclass whose __call__ evaluates its output and adds the seconds."""
        import mlx.core as mx

        base = type(model)
        forward = self.forward

        def __call__(m, *args, **kw):
            t0 = time.perf_counter()
            out = base.__call__(m, *args, **kw)
            mx.eval(out)
            forward[label] += time.perf_counter() - t0
            return out

        model.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": __call__})


if __name__ == "__main__":
    main()
