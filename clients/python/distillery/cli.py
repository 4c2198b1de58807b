"""`distillery`: the command line over the SDK. Tables for people, `--json` for scripts.

Exit codes: 0 done; 1 the API or a local check refused (the message says why); 2 bad usage; 3 the job failed
or was cancelled (`submit --wait`, `wait`, `logs -f`); 4 the server could not be reached; 5 `--timeout` ran
out; 130 interrupted; 141 the output was closed early (`distillery logs --json | head`), silently.

Errors are one line on stderr (`error: ...`; a dataset's bad lines follow it, one per line); under `--json`
they are one JSON object on stderr instead, `{"error": {"message", "exit_code", "status"?, "errors"?}}`, and
stdout holds only JSON.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import warnings
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from distillery_contract.jobs import JOB_KINDS

from ._client import Distillery
from ._config import DEFAULT_BASE_URL, KEYS, config_path, read_settings, resolve_config, save_settings
from ._exceptions import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConfigError,
    DistilleryError,
    JobFailedError,
    JobWarningIssued,
    WaitTimeout,
)
from ._progress import waiting_text
from .types import Job

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_JOB_FAILED, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
MAX_ERROR_LINES = 20
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A refusal of this command line: printed as `error: ...` (or JSON), exit `code`."""

    def __init__(self, message: str, code: int = EXIT_ERROR, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.extra = code, extra


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    hide = argparse.SUPPRESS  # so a flag given before the subcommand is not reset by the subcommand's default
    common.add_argument("--json", action="store_true", default=hide, help="print the object(s) as JSON")
    common.add_argument("--base-url", default=hide, help="default: $DISTILLERY_BASE_URL, then the config file")
    common.add_argument("--api-key", default=hide, help="default: $DISTILLERY_API_KEY, then the config file")
    common.add_argument("--profile", default=hide, help="a profile of the config file")
    p = argparse.ArgumentParser(
        prog="distillery",
        parents=[common],
        description="Distillery client: datasets, models, jobs, artifacts. Settings: --base-url / --api-key, "
        "then $DISTILLERY_BASE_URL / $DISTILLERY_API_KEY, then the config file (`distillery login` stores the key "
        "there).",
        epilog="exit codes: 0 ok, 1 refused, 2 usage, 3 job failed, 4 unreachable, 5 timeout",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent, name: str, help: str):
        return parent.add_parser(name, parents=[common], help=help, description=help)

    ds = cmd(sub, "datasets", "upload and list datasets").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = cmd(ds, "upload", "upload a JSONL dataset")
    c.add_argument("file")
    c.add_argument("--name")
    c.add_argument("--format", choices=["text", "completions", "chat", "preference", "mcq", "prompts"])
    cmd(ds, "list", "list datasets")
    for action, help in (("get", "show a dataset"), ("delete", "delete a dataset")):
        cmd(ds, action, help).add_argument("id")

    ms = cmd(sub, "models", "register and list models").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = cmd(ms, "add", "register a model folder or GGUF file on the server's disk")
    c.add_argument("path")
    c.add_argument("--name")
    c = cmd(ms, "upload", "upload a local GGUF file")
    c.add_argument("file")
    c.add_argument("--name")
    cmd(ms, "list", "list models")
    cmd(ms, "get", "show a model").add_argument("id")

    c = cmd(sub, "submit", "create a job from a YAML file (kind + spec)")
    c.add_argument("file")
    c.add_argument("--parent", help="the job this one follows")
    c.add_argument("--wait", action="store_true", help="follow the job (and its evaluation) to its end")
    c.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    c.add_argument("--no-children", action="store_true", help="with --wait: do not follow the evaluation job")
    c = cmd(sub, "wait", "follow a job (and its evaluation) to its end")
    c.add_argument("id")
    c.add_argument("--timeout", type=float)
    c.add_argument("--no-children", action="store_true", help="do not follow the evaluation job")
    c = cmd(sub, "jobs", "list jobs, newest first")
    c.add_argument("--status")
    c.add_argument("--kind", choices=list(JOB_KINDS))
    c.add_argument("--limit", type=int, default=50, help="show at most this many (default 50; 0: all)")
    c.add_argument("--wide", action="store_true", help="never shorten a column to the terminal's width")
    c.add_argument("-q", "--quiet", action="store_true", help="print the ids alone, one a line")
    cmd(sub, "status", "show a job").add_argument("id")
    c = cmd(sub, "generate", "one prompt, each model's answer side by side (a generate job, followed to its end)")
    c.add_argument("--prompt", required=True, help="the text the models continue ('-': read it from stdin)")
    c.add_argument("--chat", action="store_true", help="send it as one user message (each model's chat template)")
    c.add_argument(
        "--job", metavar="DISTILL_JOB", help="its first teacher, its student before and the distilled student"
    )
    c.add_argument("--model", action="append", default=[], metavar="[LABEL=]ID", help="a model id (repeatable)")
    c.add_argument(
        "--adapter", action="append", default=[], metavar="[LABEL=]JOB", help="a distill job's student + adapter"
    )
    c.add_argument(
        "--student-of", action="append", default=[], metavar="[LABEL=]JOB", help="a distill job's student before"
    )
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    cmd(sub, "results", "a benchmark's table (of a benchmark job, or of a distill job's evaluation)").add_argument("id")
    c = cmd(sub, "logs", "a job's events")
    c.add_argument("id")
    c.add_argument("-f", "--follow", action="store_true", help="keep printing events until the job ends")
    c = cmd(sub, "metrics", "a job's logged metrics")
    c.add_argument("id")
    c.add_argument("--name", help="one metric, e.g. val_kl")
    cmd(sub, "checkpoints", "a job's checkpoints").add_argument("id")
    cmd(sub, "artifacts", "a job's artifacts").add_argument("id")
    cmd(sub, "cancel", "cancel a job").add_argument("id")
    c = cmd(sub, "download", "download a job's artifacts (sha256 checked, resumable)")
    c.add_argument("id")
    c.add_argument("--out", required=True, help="folder to write into")

    c = cmd(sub, "login", "check an API key against the server and store it in the config file (mode 0600)")
    c.add_argument("--no-verify", action="store_true", help="store the key without asking the server")
    cf = cmd(sub, "config", "the config file's settings").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = cmd(cf, "set", "set a setting in the config file")
    c.add_argument("key", choices=KEYS)
    c.add_argument("value")
    cmd(cf, "unset", "remove a setting from the config file").add_argument("key", choices=KEYS)
    cmd(cf, "show", "the settings in use and where each comes from (the key masked)")
    cmd(cf, "path", "where the config file is")
    return p


# ----------------------------------------------------------------------------------------------- output


def _dump(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    return obj


def _table(columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in columns:
        table.add_column(name)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def _size(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _progress(job: Job) -> str:
    p = job.progress
    if job.kind == "teacher_cache" and p.total_steps:  # tokens: a percentage reads better
        return f"{(p.fraction or 0):.0%}"
    return f"{p.step}/{p.total_steps}" if p.total_steps else (str(p.step) if p.step else "")


def _print_jobs(args: argparse.Namespace, jobs: list[Job]) -> None:
    """Full ids always (they are what the other commands take); a failed job's error on the line below it,
    cut to the terminal's width unless `--wide`."""
    if args.quiet:
        for j in jobs:
            print(j.id)
        return
    header = ["ID", "KIND", "STATUS", "PROGRESS", "CREATED"]
    rows = [
        [j.id, j.kind, j.status, _progress(j), j.created_at.strftime("%m-%d %H:%M") if j.created_at else ""]
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    width = None if args.wide else out.width

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out.print(line(header), style="bold", markup=False)
    for job, row in zip(jobs, rows):
        out.print(line(row), markup=False)
        note = f"{job.error.code}: {job.error.message}" if job.error else waiting_text(job)
        if note:
            note = "  " + " ".join(note.split())
            if width and len(note) > width:
                note = note[: width - 1] + "…"
            out.print(note, style="dim", markup=False)


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "agreement" in name or "accuracy" in name:
        return f"{value:.1%}"
    if "bytes" in name:
        return _size(value)
    if "per_second" in name:
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# What `status` shows of a job's summary, by kind: the same names whether the job runs, was cancelled or
# succeeded (a run's summary holds its latest step and evaluation while it runs, its summary.json at the end).
DISTILL_METRICS = (
    ("loss", "loss"),
    ("val_kl", "val KL"),
    ("val_reverse_kl", "val reverse KL"),
    ("val_ppl", "val ppl"),
    ("val_top1_agreement", "val top-1"),
    ("tokens_per_second", "tokens/s"),
    ("lr", "learning rate"),
)
CACHE_METRICS = (
    ("tokens", "tokens"),
    ("examples", "sequences"),
    ("bytes_per_token", "bytes/token"),
    ("reconstruction_kl", "reconstruction KL"),
    ("build_tokens_per_second", "tokens/s"),
    ("size_bytes", "size"),
)


def _summary_rows(job: Job) -> list[list[str]]:
    s = job.summary
    rows: list[list[str]] = []
    if job.kind == "distill":
        initial, final = s.get("initial") or {}, s.get("final") or {}
        train = s.get("train") or {}
        for key, label in DISTILL_METRICS:
            if key in final or key in initial:  # the finished run: before -> after
                before, after = initial.get(key), final.get(key)
                if before is not None and after is not None:
                    rows.append([label, f"{_fmt(key, before)} → {_fmt(key, after)}"])
                elif after is not None:
                    rows.append([label, _fmt(key, after)])
            elif key in train:
                rows.append([label, _fmt(key, train[key])])
            elif s.get(key) is not None and not isinstance(s[key], (dict, list)):
                rows.append([label, _fmt(key, s[key])])
        best = s.get("best") or {}
        if best.get("step") is not None:
            rows.append(["best step", str(best["step"]) + (f" ({s['shipped']})" if s.get("shipped") else "")])
        if s.get("learning_rate") is not None and not any(r[0] == "learning rate" for r in rows):
            rows.append(["learning rate", _fmt("lr", s["learning_rate"])])
    elif job.kind == "teacher_cache":
        rows += [[label, _fmt(key, s[key])] for key, label in CACHE_METRICS if s.get(key) is not None]
    elif job.kind == "benchmark":
        for label, metrics in (s.get("metrics") or {}).items():
            shown = [f"{name} {_fmt(k, metrics[k])}" for k, name in RESULT_COLUMNS[:3] if metrics.get(k) is not None]
            rows.append([f"[{escape(label)}]", "  ".join(shown)])
        if s.get("metrics"):
            rows.append(["results", f"distillery results {job.id}"])
    elif job.kind == "generate":
        for a in s.get("answers") or []:
            text = " ".join(str(a.get("text") or "").split())
            rows.append([f"[{escape(a['label'])}]", (text[:70] + "…" if len(text) > 70 else text) or "(empty)"])
    return rows


def _job_detail(job: Job) -> Table:
    rows = [["id", job.id], ["kind", job.kind], ["status", job.status], ["progress", _progress(job)]]
    if job.progress.eta_seconds is not None and job.status == "running":
        rows.append(["eta", f"{job.progress.eta_seconds:.0f} s"])
    for w in job.waiting_on:
        pct = f" {w.fraction:.0%}" if w.fraction is not None else ""
        rows.append(["waiting on", f"{w.kind} job {w.id} ({w.status}{pct})"])
    if job.parent_id:
        rows.append(["parent", job.parent_id])
    for name in ("created_at", "started_at", "finished_at"):
        if getattr(job, name):
            rows.append([name.replace("_at", ""), getattr(job, name).isoformat(timespec="seconds")])
    if job.error:
        rows.append(["error", f"{job.error.code}: {job.error.message}"])
    for w in job.warnings:
        rows.append(["[bold yellow]warning[/bold yellow]", f"[bold yellow]{escape(w.message)}[/bold yellow]"])
    rows += [[label, escape(value)] for label, value in _summary_rows(job)]
    if job.artifacts:
        rows.append(
            ["artifacts", ", ".join(a.name for a in job.artifacts[:8]) + (" ..." if len(job.artifacts) > 8 else "")]
        )
    table = _table(["", ""], rows)
    table.show_header = False
    return table


RESULT_COLUMNS = (
    ("ppl", "ppl"),
    ("kl", "KL"),
    ("top1_agreement", "top-1"),
    ("top5_agreement", "top-5"),
    ("mcq_accuracy", "MCQ"),
    ("pref_accuracy", "pref"),
    ("pref_accuracy_norm", "pref/tok"),
    ("prefill_tokens_per_second", "prefill t/s"),
    ("decode_tokens_per_second", "decode t/s"),
    ("peak_memory_bytes", "peak mem"),
    ("size_bytes", "size"),
    ("compression_ratio_params", "compr."),
)


def _results_table(reference: str, metrics: dict[str, dict[str, Any]]) -> Table:
    keep = [(k, h) for k, h in RESULT_COLUMNS if any(m.get(k) is not None for m in metrics.values())]
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("model", no_wrap=True)
    for _, header in keep:
        table.add_column(header, justify="right", no_wrap=True)
    for label, m in metrics.items():
        cells = ["–" if m.get(k) is None else _result_cell(k, m[k]) for k, _ in keep]
        table.add_row(f"[bold]{escape(label)}[/bold]" if label == reference else escape(label), *cells)
    return table


def _result_cell(key: str, value: Any) -> str:
    if key == "kl":
        return f"{value:.4f}"
    if key == "ppl":
        return f"{value:.4g}"
    if key.startswith("compression"):
        return f"{value:.2f}x"
    return _fmt(key, value)


def _show(args: argparse.Namespace, obj: Any, human: Any) -> None:
    if args.json:
        print(json.dumps(_dump(obj), indent=2, default=str))
    else:
        out.print(human)


# ----------------------------------------------------------------------------------------------- commands


def _run(args: argparse.Namespace, client: Distillery) -> int:
    cmd, action = args.command, getattr(args, "action", None)
    if cmd == "datasets":
        if action == "upload":
            d = client.datasets.upload(args.file, name=args.name, format=args.format)
            _show(args, d, f"{d.id}  {d.name}  {d.format}  {d.records} records  {_size(d.size_bytes)}")
        elif action == "list":
            items = list(client.datasets.list())
            _show(
                args,
                items,
                _table(
                    ["ID", "NAME", "FORMAT", "RECORDS", "SIZE"],
                    [[d.id, d.name, d.format, d.records, _size(d.size_bytes)] for d in items],
                ),
            )
        elif action == "get":
            d = client.datasets.get(args.id)
            _show(
                args, d, f"{d.id}  {d.name}  {d.format}  {d.records} records  {_size(d.size_bytes)}  sha256 {d.sha256}"
            )
        else:
            client.datasets.delete(args.id)
            _show(args, {"id": args.id, "deleted": True}, f"deleted {args.id}")
    elif cmd == "models":
        if action in ("add", "upload", "get"):
            m = (
                client.models.add(args.path, name=args.name)
                if action == "add"
                else client.models.upload(args.file, name=args.name)
                if action == "upload"
                else client.models.get(args.id)
            )
            _show(args, m, f"{m.id}  {m.name}  {m.format}")
        else:
            items = list(client.models.list())
            _show(
                args,
                items,
                _table(["ID", "NAME", "FORMAT", "SOURCE"], [[m.id, m.name, m.format, m.source] for m in items]),
            )
    elif cmd == "submit":
        job = client.jobs.create(args.file, parent_id=args.parent)
        if not args.wait:
            _show(args, job, job.id if not sys.stdout.isatty() else _job_detail(job))
            return EXIT_OK
        if not args.json:
            err.print(f"submitted {job.kind} job {job.id}", markup=False)
        return _wait(args, client, job.id)
    elif cmd == "wait":
        return _wait(args, client, args.id)
    elif cmd == "jobs":
        items = []
        for job in client.jobs.list(status=args.status, kind=args.kind, limit=min(args.limit or 100, 100)):
            items.append(job)
            if args.limit and len(items) >= args.limit:
                break
        if args.json:
            _show(args, items, None)
        else:
            _print_jobs(args, items)
    elif cmd == "status":
        job = client.jobs.get(args.id)
        _show(args, job, _job_detail(job))
    elif cmd == "results":
        return _results(args, client)
    elif cmd == "generate":
        return _generate(args, client)
    elif cmd == "logs":
        return _logs(args, client)
    elif cmd == "metrics":
        points = client.jobs.metrics(args.id, name=args.name)
        if args.name and not points:
            names = sorted({m.name for m in client.jobs.metrics(args.id)})
            have = f"it has: {', '.join(names)}" if names else "it has logged no metrics yet"
            raise CliError(f"--name {args.name}: job {args.id} has no metric {args.name!r}; {have}")
        _show(
            args,
            points,
            _table(["STEP", "KIND", "NAME", "VALUE"], [[m.step, m.kind, m.name, f"{m.value:.6g}"] for m in points]),
        )
    elif cmd == "checkpoints":
        items = client.jobs.checkpoints(args.id)
        _show(args, items, _table(["ID", "STEP", "CREATED"], [[c.id, c.step, c.created_at] for c in items]))
    elif cmd == "artifacts":
        items = client.artifacts.list(args.id)
        _show(
            args,
            items,
            _table(
                ["ID", "NAME", "SIZE", "SHA256"], [[a.id, a.name, _size(a.size_bytes), a.sha256[:16]] for a in items]
            ),
        )
    elif cmd == "cancel":
        job = client.jobs.cancel(args.id)
        _show(args, job, f"{job.id}  {job.status}")
    elif cmd == "download":
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise CliError(f"--out {args.out}: is a file, not a folder; name a folder to download into")
        paths = client.artifacts.download(args.id, args.out)
        _show(args, [str(p) for p in paths], "\n".join(str(p) for p in paths) or "(the job has no artifacts)")
    return EXIT_OK


def _wait(args: argparse.Namespace, client: Distillery, job_id: str) -> int:
    """Follow the job to its end, then (unless --no-children) the jobs it started, e.g. the benchmark that
    evaluates a distill job: `--wait` returns when there is nothing left to run. The timeout covers them all."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    job, failure = _wait_one(args, client, job_id, deadline)
    children: list[Job] = []
    if failure is None and not getattr(args, "no_children", False):
        for child in client.jobs.list(parent_id=job.id):
            if not args.json:
                err.print(f"following {child.kind} job {child.id} (the evaluation of {job.id})", markup=False)
            child, failure = _wait_one(args, client, child.id, deadline)
            children.append(child)
            if failure is not None:
                break
    if args.json:
        print(json.dumps({**_dump(job), **({"children": _dump(children)} if children else {})}, indent=2, default=str))
    else:
        out.print(_job_detail(job))
        for child in children:
            out.print(f"\n{child.kind} job {child.id}: {child.status}", markup=False)
            if child.kind == "benchmark" and child.status == "succeeded":
                _print_results(client, child)
    for j in [job, *children]:
        for w in j.warnings:
            err.print(f"warning: {w.message}", style="bold yellow", markup=False)
    if failure is not None:
        raise failure
    return EXIT_OK


def _wait_one(
    args: argparse.Namespace, client: Distillery, job_id: str, deadline: float | None
) -> tuple[Job, CliError | None]:
    """The job at its end (or when the time is up), and the error to end with when it did not succeed."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        with warnings.catch_warnings():  # the job's warnings are printed by _wait, as this CLI prints things
            warnings.simplefilter("ignore", JobWarningIssued)
            return client.jobs.wait(job_id, timeout=timeout, progress=not args.json and sys.stderr.isatty()), None
    except JobFailedError as e:
        return e.job, CliError(str(e), EXIT_JOB_FAILED)
    except WaitTimeout as e:
        return e.job, CliError(f"job {e.job.id} is still {e.job.status} after {args.timeout:g}s", EXIT_TIMEOUT)


def _generate_models(args: argparse.Namespace, client: Distillery) -> list[dict[str, str]]:
    """The spec's models from --job, --model, --adapter and --student-of, in that order."""
    models: list[dict[str, str]] = []
    if args.job:
        job = client.jobs.get(args.job)
        if job.kind != "distill":
            raise CliError(f"--job {args.job}: a {job.kind} job; name a distill job")
        teachers = job.spec.get("teachers") or []
        if teachers:
            models.append({"label": "teacher", "model": teachers[0]["model"]})
        models += [{"label": "student (before)", "student_of": job.id}, {"label": "distilled", "adapter": job.id}]
    for flag, key, default in (
        ("model", "model", "{}"),
        ("adapter", "adapter", "adapter of {}"),
        ("student_of", "student_of", "student of {}"),
    ):
        for value in getattr(args, flag):
            label, _, ref = value.rpartition("=")
            models.append({"label": label or default.format(ref), key: ref})
    if not models:
        raise CliError("name the models that answer: --job DISTILL_JOB, --model ID, --adapter JOB or --student-of JOB")
    return models


def _generate(args: argparse.Namespace, client: Distillery) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    spec = {
        "prompt": [{"role": "user", "content": prompt}] if args.chat else prompt,
        "models": _generate_models(args, client),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    job = client.jobs.create({"kind": "generate", "spec": spec})
    if not args.json:
        err.print(f"submitted generate job {job.id}", markup=False)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    job, failure = _wait_one(args, client, job.id, deadline)
    if failure is not None:
        raise failure
    answers = job.summary.get("answers") or []
    if args.json:
        print(json.dumps(_dump(job), indent=2, default=str))
        return EXIT_OK
    stats = [f"{a['tokens']} tokens, {a['seconds']:.2f} s, {a['tokens_per_second']:.1f} tokens/s" for a in answers]
    if answers and out.width // len(answers) < 32:  # too narrow for columns: one answer after another
        for a, line in zip(answers, stats):
            out.rule(escape(a["label"]), align="left")
            out.print(Text(a.get("text") or ""))
            out.print(Text(line, style="dim"))
        return EXIT_OK
    table = Table(show_lines=True, expand=True)
    for a in answers:
        table.add_column(escape(a["label"]), overflow="fold", ratio=1)
    table.add_row(*[Text(a.get("text") or "") for a in answers])
    table.add_row(*[Text(line, style="dim") for line in stats])
    out.print(table)
    return EXIT_OK


def _results(args: argparse.Namespace, client: Distillery) -> int:
    job = client.jobs.get(args.id)
    if job.kind == "distill":
        evaluations = [c for c in client.jobs.list(parent_id=job.id) if c.kind == "benchmark"]
        if not evaluations:
            raise CliError(
                f"job {job.id} is a distill job without an evaluation (its spec has no `evaluate`); "
                f"`distillery status {job.id}` shows its metrics"
            )
        job = evaluations[0]
    elif job.kind != "benchmark":
        raise CliError(f"job {job.id} is a {job.kind} job; results shows a benchmark job's table")
    if job.status != "succeeded" or not job.summary.get("metrics"):
        why = f": {job.error.message}" if job.error else ""
        raise CliError(f"benchmark job {job.id} is {job.status}{why}; its results come when it succeeds")
    if args.json:
        print(json.dumps({"job_id": job.id, **_report_metrics(client, job)}, indent=2, default=str))
    else:
        _print_results(client, job)
    return EXIT_OK


def _report_metrics(client: Distillery, job: Job) -> dict[str, Any]:
    """{reference, metrics: {label: {...}}}: from the job's report.json (every metric), else its summary."""
    report = next((a for a in job.artifacts if a.name == "report.json"), None)
    if report is not None and report.size_bytes < 16 << 20:
        try:
            data = json.loads(client.artifacts.read(report.id))
            return {
                "reference": data["reference"],
                "metrics": {c["label"]: c["metrics"] for c in data["candidates"]},
            }
        except (APIError, ValueError, KeyError, TypeError):
            pass
    return {"reference": job.summary.get("reference"), "metrics": job.summary.get("metrics") or {}}


def _print_results(client: Distillery, job: Job) -> None:
    r = _report_metrics(client, job)
    out.print(_results_table(r["reference"], r["metrics"]))
    out.print(f"[dim]reference: {escape(str(r['reference']))} (bold)[/dim]")
    out.print(f"[dim]full report: distillery download {job.id} --out DIR[/dim]")


def _logs(args: argparse.Namespace, client: Distillery) -> int:
    def line(e) -> str:
        when = e.created_at.strftime("%H:%M:%S") if e.created_at else ""
        return f"{e.id:>6}  {when}  {e.kind:<14} {e.message or ''}"

    if not args.follow:
        events = client.jobs.events(args.id)
        if args.json:
            _show(args, events, None)
        else:
            for e in events:
                out.print(line(e), markup=False)
        return EXIT_OK
    for event in client.jobs.stream_events(args.id):
        if args.json:
            print(json.dumps(_dump(event), default=str), flush=True)  # one object per line while following
        else:
            out.print(line(event), markup=False)
    job = client.jobs.get(args.id)
    if job.status != "succeeded":
        raise CliError(f"job {job.id} {job.status}", EXIT_JOB_FAILED)
    return EXIT_OK


# --------------------------------------------------------------------------------------- configuration


def _mask(key: str | None) -> str:
    return "" if not key else key[:8] + "…" if len(key) > 12 else "…"


def _source(source: str, what: str) -> str:
    """Where a setting came from, in words that say what to change."""
    if source == "argument":
        return "--api-key" if what == "api_key" else "--base-url"
    if source.startswith("env:"):
        return f"${source[4:]}"
    if source.startswith("file:"):
        return f"the config file {source[5:]}"
    return "the default" if source == "default" else "nowhere"


def _login(args: argparse.Namespace) -> int:
    key = args.api_key
    if not key:
        if sys.stdin.isatty():
            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline()
        key = key.strip()
    if not key:
        raise CliError("no API key given: pass --api-key KEY, or type it (or pipe it) when asked")
    try:  # the server to check the key with: --base-url, $DISTILLERY_BASE_URL, the file (its profile)
        base_url = resolve_config(args.base_url, key, profile=args.profile).base_url
    except ConfigError:  # no file yet (or no such profile in it): the flag, the variable or the default
        base_url = args.base_url or os.environ.get("DISTILLERY_BASE_URL") or DEFAULT_BASE_URL
    with Distillery(base_url, key, timeout=60.0, max_retries=3) as client:
        if not args.no_verify:
            try:
                next(iter(client.jobs.list(limit=1)), None)
            except AuthenticationError:
                raise CliError(f"{client.base_url} refused this API key; nothing was stored") from None
            except APIConnectionError as e:
                raise CliError(
                    f"cannot reach the server at {client.base_url} to check the key ({e}); pass --base-url, or "
                    "--no-verify to store it unchecked",
                    EXIT_UNREACHABLE,
                ) from None
        values: dict[str, Any] = {"api_key": key}
        if args.base_url:
            values["base_url"] = client.base_url
        path = save_settings(values, profile=args.profile)
    where = f" (profile {args.profile})" if args.profile else ""
    message = f"stored the API key for {client.base_url} in {path}{where}, readable by you alone (0600)"
    if os.environ.get("DISTILLERY_API_KEY"):
        message += "; note: $DISTILLERY_API_KEY is set and wins over the stored key"
    _show(args, {"path": str(path), "base_url": client.base_url, "profile": args.profile}, message)
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    path = config_path()
    if args.action == "path":
        _show(args, {"path": str(path)}, str(path))
    elif args.action in ("set", "unset"):
        value: Any = None
        if args.action == "set":
            value = args.value
            if args.key in ("timeout", "max_retries"):
                try:
                    value = float(value) if args.key == "timeout" else int(value)
                except ValueError:
                    raise CliError(f"{args.key}: expected a number, got {args.value!r}") from None
        save_settings({args.key: value}, profile=args.profile)
        shown = _mask(value) if args.key == "api_key" else value
        _show(
            args,
            {"path": str(path), "key": args.key, "set": value is not None},
            f"{args.key} {'= ' + str(shown) if value is not None else 'removed'} in {path}",
        )
    else:
        with Distillery(args.base_url, args.api_key, profile=args.profile) as client:
            config = client.config
        data = read_settings(path)
        shown = {
            "config_file": str(path) if data else None,
            "base_url": config.base_url,
            "base_url_from": _source(config.sources.get("base_url", "default"), "base_url"),
            "api_key": _mask(config.api_key) or None,
            "api_key_from": _source(config.sources.get("api_key", "unset"), "api_key"),
            "timeout": config.timeout,
            "max_retries": config.max_retries,
        }
        _show(args, shown, "\n".join(f"{k:<14} {'' if v is None else v}" for k, v in shown.items()))
    return EXIT_OK


def _explain(e: APIError | APIConnectionError, client: Distillery | None) -> str:
    """The error, with the variable, flag or file the user should change named."""
    if client is None:
        return str(e)
    sources = client.config.sources
    if isinstance(e, APIConnectionError):
        src = _source(sources.get("base_url", "default"), "base_url")
        return (
            f"cannot reach the server at {client.base_url} (the base URL from {src}; set $DISTILLERY_BASE_URL "
            f"or pass --base-url): {e}"
        )
    lines = e.lines()
    if isinstance(e, AuthenticationError):
        if not client.api_key:
            lines[0] = (
                f"{e.status}: no API key: set $DISTILLERY_API_KEY, pass --api-key, or store one with "
                f"`distillery login` (in {config_path()}); the server said: {lines[0]}"
            )
        else:
            src = _source(sources.get("api_key", "unset"), "api_key")
            lines[0] = f"{e.status}: the API key from {src} was refused: {lines[0]}"
        return "\n".join(lines)
    if len(lines) > MAX_ERROR_LINES:
        lines = lines[:MAX_ERROR_LINES] + [f"... and {len(lines) - MAX_ERROR_LINES} more"]
    return "\n".join([f"{e.status}: {lines[0]}"] + [f"  {line}" for line in lines[1:]])


def _fail(args: argparse.Namespace, message: str, code: int, **extra: Any) -> int:
    if getattr(args, "json", False):
        body = {"message": message.splitlines()[0] if message else "", "exit_code": code, **extra}
        print(json.dumps({"error": body}, default=str), file=sys.stderr)
    else:
        err.print(f"error: {message}", markup=False)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE
    for name, default in (("json", False), ("base_url", None), ("api_key", None), ("profile", None)):
        setattr(args, name, getattr(args, name, default))
    client: Distillery | None = None
    try:
        if args.command == "login":
            return _login(args)
        if args.command == "config":
            return _config(args)
        with Distillery(args.base_url, args.api_key, profile=args.profile) as client:
            return _run(args, client)
    except CliError as e:
        return _fail(args, str(e), e.code, **e.extra)
    except APIError as e:
        return _fail(args, _explain(e, client), EXIT_ERROR, status=e.status, errors=e.errors, type=e.type)
    except APIConnectionError as e:
        return _fail(args, _explain(e, client), EXIT_UNREACHABLE)
    except BrokenPipeError:
        # the reader went away (`| head`): say nothing, and keep Python from complaining at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except (DistilleryError, OSError) as e:
        message = " ".join(str(e).split())
        if isinstance(e, OSError) and e.filename and e.strerror:
            message = f"{e.filename}: {e.strerror}"
        return _fail(args, message, EXIT_ERROR)
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
