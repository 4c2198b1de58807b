"""`distillery-server distill CONFIG.yaml --out DIR`: one distill spec run locally, with a progress bar.

References in the spec are local paths (relative ones are taken from the config file's folder); GGUF files are
imported once into the cache folder. The run itself is `distill.run_distill`, the worker's code path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from distillery_contract.specs import DistillSpec

from .errors import UserError

if TYPE_CHECKING:
    from rich.progress import TaskID


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILLERY_CACHE_DIR", Path.home() / ".cache" / "distillery"))


def load_spec(config: Path) -> DistillSpec:
    try:
        doc = yaml.safe_load(config.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{config}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{config}: expected a mapping with `kind` and `spec`")
    if "kind" in doc:
        if doc["kind"] != "distill":
            raise UserError(f"{config}: kind {doc['kind']!r} cannot run locally; `distill` runs distill specs")
        doc = doc.get("spec") or {}
    try:
        return DistillSpec.model_validate(doc)
    except ValidationError as e:
        raise UserError(f"{config}: invalid spec: " + format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def resolve_inputs(spec: DistillSpec, base: Path, cache_dir: Path):
    from .distill import Inputs
    from .models import resolve_model

    def path(ref: str, field: str, must_be_file: bool = False) -> Path:
        p = Path(ref).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists() or (must_be_file and not p.is_file()):
            raise UserError(f"{field}: {ref} not found")
        return p

    imports = cache_dir / "models"
    student = resolve_model(path(spec.student.model, "student.model"), imports, "student.model")
    teachers = [
        resolve_model(path(t.model, f"teachers.{i}.model"), imports, f"teachers.{i}.model")
        for i, t in enumerate(spec.teachers)
    ]
    valid = spec.data.valid
    return Inputs(
        student=student,
        teachers=teachers,
        train=path(spec.data.train, "data.train", must_be_file=True),
        valid=valid if isinstance(valid, float) else path(valid, "data.valid", must_be_file=True),
        student_adapter=path(spec.student.adapter, "student.adapter") if spec.student.adapter else None,
        preference=path(spec.data.preference, "data.preference", must_be_file=True) if spec.data.preference else None,
    )


def run_local(config: Path, out_dir: Path, cache_dir: Path | None = None, progress: bool = True) -> dict:
    from .cache import CacheStore
    from .distill import run_distill
    from .evaluate import describe, describe_change
    from .train import Hooks

    spec = load_spec(config)
    cache_dir = cache_dir or default_cache_dir()
    inputs = resolve_inputs(spec, config.parent.resolve(), cache_dir)
    store = CacheStore(cache_dir / "teacher-caches")
    bar = _ProgressBar(spec.training.steps) if progress and sys.stderr.isatty() else None

    def on_event(kind: str, message: str, data: dict) -> None:
        if kind == "cache_progress":
            if bar is not None:
                bar.cache(data["done"], data["total"])
        else:
            _print(f"[{kind}] {message}", bar)

    def on_metrics(r: dict) -> None:
        if r["kind"] == "eval":
            _print(f"[eval] step {r['step']}: {describe(r)}", bar)
        elif bar is None and (r["step"] % 10 == 0 or r["step"] == spec.training.steps):
            print(
                f"step {r['step']}/{spec.training.steps} loss {r['loss']:.4f} {r['tokens_per_second']:.0f} tok/s",
                flush=True,
            )

    hooks = Hooks(on_metrics=on_metrics, on_event=on_event)
    try:
        summary = run_distill(spec, inputs, out_dir, store, hooks, on_progress=bar.step if bar else None)
    finally:
        if bar:
            bar.close()
    i, f = summary["initial"], summary["final"]
    print(f"{describe_change(i, f)}; {summary['train']['tokens_per_second']:.0f} tokens/s; adapter in {out_dir}")
    for w in summary.get("warnings", []):
        print(f"WARNING: {w['message']}", file=sys.stderr, flush=True)
    return summary


def _print(line: str, bar) -> None:
    if bar:
        bar.progress.console.print(line)
    else:
        print(line, flush=True)


class _ProgressBar:
    """rich progress: step/total, loss, tokens/s, ETA."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("distill", total=total, info="")
        self.cache_task: TaskID | None = None

    def cache(self, done: int, total: int) -> None:
        if self.cache_task is None:
            self.cache_task = self.progress.add_task("teacher cache", total=total, info="tokens")
        self.progress.update(self.cache_task, completed=done, total=total)

    def step(self, r: dict) -> None:
        self.progress.update(
            self.task, completed=r["step"], info=f"loss {r['loss']:.4f}  {r['tokens_per_second']:.0f} tok/s"
        )

    def close(self) -> None:
        self.progress.stop()
