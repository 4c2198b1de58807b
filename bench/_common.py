"""Shared plumbing for bench/cache_speed.py, bench/step_speed.py and bench/cache_quality.py.

Import this module first, before anything imports MLX: it puts the repository on sys.path and calls
`worker.engine.blas.enable()` (which must run before `import mlx` to route MLX's sgemm to OpenBLAS).

Comparisons with older code are made against a git revision, not against copies kept here: a script's
`--against REV` (add_against_args / run_against) runs the script twice or more, on this tree's engine and on
REV's (a temporary `git worktree`, put first on sys.path through DISTILLERY_BENCH_REPO), and prints the ratio
of the two runs' RESULT figures.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the tree these bench scripts belong to
# The repository the scripts import the engine (worker/, tests/helpers) from: this tree, or the other
# revision's worktree when run_against starts this script there.
REPO = Path(os.environ.get("DISTILLERY_BENCH_REPO") or HERE).resolve()
if not sys.path or sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))


def _enable(module: str) -> str:
    """`worker.engine.<module>.enable()` if the revision has the module (blas: before MLX is imported;
    cpu_jit: before MLX compiles anything)."""
    try:
        mod = importlib.import_module(f"worker.engine.{module}")
    except ImportError as e:
        return f"unchanged: worker.engine.{module} not importable ({e})"
    return mod.enable()


BLAS = _enable("blas")
CPU_JIT = _enable("cpu_jit")

import numpy as np  # noqa: E402


def reuse_buffers() -> str:
    """What training and cache jobs run with (worker.engine.cpu_memory.reusing_buffers): MLX's CPU buffer
    cache raised, for the rest of this process. The training and caching benches call it."""
    return _enable("cpu_memory")


def add_common_args(parser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="mlx-lm model folder (default: SmolLM2-135M from service.commands.realdata.smollm2_model())",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random model (tests/helpers/tiny.py) and small sizes: a smoke test in seconds",
    )


def add_against_args(parser) -> None:
    parser.add_argument(
        "--against",
        metavar="REV",
        default=None,
        help="time this script on git revision REV's engine too (a temporary worktree) and print "
        "this tree's RESULT figures over REV's",
    )
    parser.add_argument(
        "--against-runs",
        type=int,
        default=2,
        metavar="N",
        help="with --against: runs per side, alternating (this, REV, REV, this, ...; default 2)",
    )


def run_against(rev: str, runs: int = 2) -> None:
    """This script with its other arguments, on this tree's engine and on `rev`'s, and the ratio of the two.

    `git worktree add --detach` of `rev` into a temporary folder; then `runs` runs per side in one sitting on
    this machine, alternating (this, REV, REV, this, ...) so slow drifts fall on both alike. Each run is this
    tree's script in a fresh interpreter (the same venv) with DISTILLERY_BENCH_REPO naming the tree whose
    worker/ and tests/helpers it imports, so the measuring code is the same on both sides and only the engine
    differs (REV must have the engine functions the script calls). Each run's last `RESULT key=value ...` line
    is parsed; numeric figures (units such as tok/s dropped) are compared by their medians over the runs:
    this / REV. The worktree is removed afterwards.
    """
    script = Path(sys.argv[0]).resolve()
    argv = _without_against(sys.argv[1:])
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    here = _git("rev-parse", "--short", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        here += " + uncommitted changes"
    label = f"{rev} ({sha[:10]})" if not sha.startswith(rev) else sha[:10]
    print(f"== {script.name} --against {rev}: this tree (HEAD {here}) vs {label}, {runs} run(s) each, alternating")
    print(f"   each run: {Path(sys.executable).name} {script.relative_to(HERE)} {' '.join(argv)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-against-"))
    tree = tmp / "tree"
    results: dict[str, list[dict[str, str]]] = {"this": [], "rev": []}
    try:
        _git("worktree", "add", "--detach", "--quiet", str(tree), sha)
        for r in range(runs):
            for side in ("this", "rev") if r % 2 == 0 else ("rev", "this"):
                root = HERE if side == "this" else tree
                name = "this" if side == "this" else sha[:10]
                results[side].append(_run_child(script, argv, root, f"{name} {len(results[side]) + 1}/{runs}"))
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(HERE), "worktree", "prune"], capture_output=True)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    _compare(results, sha[:10])


def _without_against(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--against", "--against-runs"):
            skip = True
        elif not a.startswith(("--against=", "--against-runs=")):
            out.append(a)
    return out


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _run_child(script: Path, argv: list[str], root: Path, label: str) -> dict[str, str]:
    """One run of `script` importing the engine from `root`, its output echoed with a prefix; its RESULT."""
    env = {**os.environ, "DISTILLERY_BENCH_REPO": str(root)}
    print(f"\n-- run [{label}] (engine from {root})", flush=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    result = None
    for line in proc.stdout:
        print(f"[{label}] {line}", end="", flush=True)
        if line.startswith("RESULT "):
            result = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    if proc.wait() != 0 or result is None:
        raise SystemExit(
            f"run [{label}] failed (exit status {proc.returncode}{', no RESULT line' if result is None else ''})"
        )
    return result


_NUMBER = re.compile(r"^(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)([A-Za-z/%]*)$")


def _compare(results: dict[str, list[dict[str, str]]], rev: str) -> None:
    this, other = results["this"], results["rev"]
    name = this[-1].get("name", "bench")
    print(f"\n== {name}: this tree vs {rev} (medians over {len(this)} and {len(other)} run(s); ratio = this / REV)")
    print(f"{'':24} {'this':>12} {rev:>12} {'':6} {'ratio':>7}")
    ratios = []
    for key in this[-1]:
        if key == "name" or key not in other[-1]:
            continue
        mt = [_NUMBER.match(r.get(key, "")) for r in this]
        mo = [_NUMBER.match(r.get(key, "")) for r in other]
        if all(mt) and all(mo):
            unit = mt[-1].group(2)
            a, b = median([float(m.group(1)) for m in mt]), median([float(m.group(1)) for m in mo])
            ratio = a / b if b else float("nan")
            ratios.append(f"{key}={ratio:.3f}")
            print(f"{key:24} {a:12.6g} {b:12.6g} {unit:6} {ratio:7.3f}")
        elif this[-1][key] != other[-1][key]:
            print(f"{key:24} {this[-1][key]:>12} {other[-1][key]:>12}")
    print()
    print(load_note())
    print(f"RESULT name={name}_against against={rev} " + " ".join(ratios))


def _busy_seconds() -> float:
    """CPU seconds all processes on the machine spent busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_START: tuple[float, float, float] | None = None


def header(name: str, args) -> None:
    global _START
    _START = (time.perf_counter(), _busy_seconds(), _own_seconds())
    print(f"== {name}")
    print(f"blas: {BLAS}")
    print(
        f"cpus: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"args: {vars(args)}")
    sys.stdout.flush()


def tiny_models(root: Path, *, layers: int = 4, hidden: int = 64, pretrain_steps: int = 30) -> Path:
    """A tiny random llama (tests/helpers/tiny.py), lightly pretrained so its distribution is not flat."""
    from tests.helpers import tiny

    tok_dir = root / "tokenizer"
    tiny.build_tokenizer(tok_dir)
    model_dir = tiny.build_model(root / "tiny", tok_dir, hidden=hidden, layers=layers, heads=4, kv_heads=2)
    if pretrain_steps:
        tiny.pretrain(model_dir, steps=pretrain_steps, seq_len=32, batch=8)
    return model_dir


def resolve_model(args, tmp: Path) -> Path:
    if args.quick and args.model is None:
        return tiny_models(tmp / "quick-model")
    if args.model is not None:
        return args.model
    from service.commands.realdata import smollm2_model

    return smollm2_model()


def shakespeare_examples(tokenizer, n: int, length: int, tmp: Path, *, offset: int = 0):
    """`n` examples of exactly `length` tokens of real Shakespeare (engine tokenization, text format).

    realdata.shakespeare_splits → data.load_jsonl → data.tokenize(max_seq_len=length), keeping full windows.
    """
    from service.commands.realdata import shakespeare_splits
    from worker.engine import data as data_mod

    want = n + offset
    passages = max(8, want // 2)
    while True:
        paths = shakespeare_splits(tmp / f"shakespeare-{passages}", train=passages, valid=1, test=1, max_chars=4000)
        examples = data_mod.tokenize(data_mod.load_jsonl(paths["train"]), tokenizer, length)
        full = [e for e in examples if len(e.tokens) == length]
        if len(full) >= want or passages > 4000:
            break
        passages *= 2
    if len(full) < want:
        raise SystemExit(f"only {len(full)} Shakespeare windows of {length} tokens, wanted {want}")
    return full[offset:want]


class Rounds:
    """Per-fn seconds of each round, plus how much CPU other processes took during each round."""

    def __init__(self, names: list[str]):
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.others: list[float] = []  # cores used by other processes during each round

    def clean(self, threshold: float = 0.15, at_least: int = 3) -> list[int]:
        """Rounds during which other processes used < `threshold` cores; all rounds if fewer than `at_least`."""
        ok = [r for r, o in enumerate(self.others) if o < threshold]
        return ok if len(ok) >= at_least else list(range(len(self.others)))

    def of(self, name: str, rounds: list[int]) -> list[float]:
        return [self.times[name][r] for r in rounds]


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1, verbose: bool = True) -> Rounds:
    """Seconds per call of each fn, measured in alternation: warmup round(s), then `reps` rounds.

    Each round runs every fn once; the order alternates between rounds (A B C, C B A, A B C, ...) so slow
    drifts and background load fall on all of them alike. Each round also records the CPU other processes
    used meanwhile (from /proc/stat), so rounds hit by a burst of outside load can be told apart.
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            t = _time_one(fns[name])
            if verbose:
                print(f"  warmup {w + 1}: {name:28s} {t:8.3f} s", flush=True)
    rounds = Rounds(names)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        t0, busy0, own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        for name in order:
            rounds.times[name].append(_time_one(fns[name]))
        wall = time.perf_counter() - t0
        rounds.others.append(max(0.0, (_busy_seconds() - busy0) - (_own_seconds() - own0)) / wall)
        if verbose:
            print(
                f"  round {r + 1}/{reps}: "
                + "  ".join(f"{n}={rounds.times[n][-1]:.3f}s" for n in names)
                + f"  (others {rounds.others[-1]:.2f} cores)",
                flush=True,
            )
    return rounds


def report(rounds: Rounds, base: str, work: float, unit: str = "tok/s") -> dict[str, float]:
    """Table of medians over the clean rounds; returns name -> ratio (baseline time / its time)."""
    clean = rounds.clean()
    n = len(rounds.others)
    note = (
        "all rounds"
        if len(clean) == n
        else f"{len(clean)} of {n} rounds, those with other processes "
        f"using < 0.15 cores (rounds {[r + 1 for r in clean]})"
    )
    if len(clean) == n and any(o >= 0.15 for o in rounds.others):
        note = "all rounds (too few clean ones: outside load, treat with care)"
    b = rounds.of(base, clean)
    mb = median(b)
    print(f"\nmedians over {note}:")
    print(f"{'':26} {'median s':>9} {unit:>9} {'ratio':>7} {'paired':>7}   spread")
    ratios = {}
    for name in rounds.times:
        ts = rounds.of(name, clean)
        m = median(ts)
        ratios[name] = mb / m
        print(f"{name:26} {m:9.3f} {work / m:9.1f} {mb / m:7.3f} {paired_ratio(b, ts):7.3f}   {spread(ts)}")
    print(
        "(ratio = baseline median / its median = its speed relative to the baseline; paired = median of "
        "per-round ratios)"
    )
    return ratios


def _time_one(fn: Callable[[], None]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(base: list[float], cand: list[float]) -> float:
    """Median over rounds of baseline_time / candidate_time (= candidate speed / baseline speed)."""
    return statistics.median(b / c for b, c in zip(base, cand))


def spread(xs: list[float]) -> str:
    return f"min {min(xs):.3f} max {max(xs):.3f}"


def micro(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() (fn must evaluate its own MLX results)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_note() -> str:
    """How much CPU other processes used while this benchmark ran (they slow both sides alike)."""
    la = os.getloadavg()
    text = f"load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    if _START is not None:
        wall = time.perf_counter() - _START[0]
        others = max(0.0, (_busy_seconds() - _START[1]) - (_own_seconds() - _START[2])) / wall
        text += f"; other processes used {others:.2f} of {os.cpu_count()} cores on average during the run"
        if others > 0.25:
            text += " (machine busy: absolute numbers are noisy; the interleaved ratios less so)"
    return text


__all__ = [
    "BLAS",
    "REPO",
    "np",
    "add_common_args",
    "add_against_args",
    "run_against",
    "header",
    "resolve_model",
    "shakespeare_examples",
    "interleaved",
    "report",
    "Rounds",
    "median",
    "paired_ratio",
    "spread",
    "micro",
    "load_note",
    "tiny_models",
    "print_warnings_and_regressions",
]


def print_warnings_and_regressions(rows: list, metric: str, label: str) -> None:
    """After a table of runs ((name, summary, ...) each): every run's warnings, then which shipped a student
    worse than its start by `metric` (lower is better), named `label`."""
    for name, s, *_ in rows:
        for w in s["warnings"]:
            print(f"{name}: warning {w['code']}: {w['message']}")
    worse = [name for name, s, *_ in rows if s["final"][metric] > s["initial"][metric]]
    print(f"{label} worse than the start: {', '.join(worse) if worse else 'none'}")


def run_in_tmp(prefix: str, run: Callable, args) -> None:
    """run(args, tmp) with a scratch folder that is removed afterwards, whatever happens."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(args, tmp: Path):
    """(folder, model, tokenizer, pad id) of the benchmark's model, cast for compute as the engine does."""
    from worker.engine import models

    model_dir = resolve_model(args, tmp)
    model, tokenizer, _ = models.load_model(model_dir)
    return model_dir, model, tokenizer, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
