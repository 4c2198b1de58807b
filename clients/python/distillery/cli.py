"""`distillery`: the command line over the SDK. Tables for people, `--json` for scripts.

Exit codes: 0 done; 1 the API or a local check refused (the message says why); 2 bad usage; 3 the job failed
or was cancelled (`submit --wait`, `wait`, `logs -f`); 4 the server could not be reached; 5 `--timeout` ran
out; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._client import Distillery
from ._exceptions import APIConnectionError, APIError, DistilleryError, JobFailedError, JobWarningIssued, WaitTimeout
from .types import Job

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_JOB_FAILED, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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
        description="Distillery client: datasets, models, jobs, artifacts.",
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
    c.add_argument("--wait", action="store_true", help="follow the job to its end")
    c.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    c = cmd(sub, "wait", "follow a job to its end")
    c.add_argument("id")
    c.add_argument("--timeout", type=float)
    c = cmd(sub, "jobs", "list jobs, newest first")
    c.add_argument("--status")
    c.add_argument("--kind", choices=["distill", "teacher_cache", "benchmark"])
    c.add_argument("--limit", type=int, default=50, help="show at most this many (default 50; 0: all)")
    cmd(sub, "status", "show a job").add_argument("id")
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


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _progress(job: Job) -> str:
    p = job.progress
    return f"{p.step}/{p.total_steps}" if p.total_steps else (str(p.step) if p.step else "")


def _job_rows(jobs: list[Job]) -> Table:
    return _table(
        ["ID", "KIND", "STATUS", "PROGRESS", "CREATED", "ERROR"],
        [
            [
                j.id,
                j.kind,
                j.status,
                _progress(j),
                j.created_at and j.created_at.strftime("%Y-%m-%d %H:%M"),
                f"{j.error.code}: {j.error.message}" if j.error else "",
            ]
            for j in jobs
        ],
    )


def _job_detail(job: Job) -> Table:
    rows = [["id", job.id], ["kind", job.kind], ["status", job.status], ["progress", _progress(job)]]
    if job.progress.eta_seconds and job.status == "running":
        rows.append(["eta", f"{job.progress.eta_seconds:.0f} s"])
    if job.parent_id:
        rows.append(["parent", job.parent_id])
    for name in ("created_at", "started_at", "finished_at"):
        if getattr(job, name):
            rows.append([name.replace("_at", ""), getattr(job, name).isoformat(timespec="seconds")])
    if job.error:
        rows.append(["error", f"{job.error.code}: {job.error.message}"])
    for w in job.warnings:
        rows.append(["[bold yellow]warning[/bold yellow]", f"[bold yellow]{escape(w.message)}[/bold yellow]"])
    for key, value in job.summary.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            rows.append([key, f"{value:.6g}" if isinstance(value, float) else value])
    if job.artifacts:
        rows.append(
            ["artifacts", ", ".join(a.name for a in job.artifacts[:8]) + (" ..." if len(job.artifacts) > 8 else "")]
        )
    table = _table(["", ""], rows)
    table.show_header = False
    return table


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
            err.print(f"submitted {job.kind} job {job.id}")
        return _wait(args, client, job.id)
    elif cmd == "wait":
        return _wait(args, client, args.id)
    elif cmd == "jobs":
        items = []
        for job in client.jobs.list(status=args.status, kind=args.kind, limit=min(args.limit or 100, 100)):
            items.append(job)
            if args.limit and len(items) >= args.limit:
                break
        _show(args, items, _job_rows(items))
    elif cmd == "status":
        job = client.jobs.get(args.id)
        _show(args, job, _job_detail(job))
    elif cmd == "logs":
        return _logs(args, client)
    elif cmd == "metrics":
        points = client.jobs.metrics(args.id, name=args.name)
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
        paths = client.artifacts.download(args.id, args.out)
        _show(args, [str(p) for p in paths], "\n".join(str(p) for p in paths) or "(the job has no artifacts)")
    return EXIT_OK


def _wait(args: argparse.Namespace, client: Distillery, job_id: str) -> int:
    try:
        with warnings.catch_warnings():  # the job's warnings are printed below, as this CLI prints things
            warnings.simplefilter("ignore", JobWarningIssued)
            job = client.jobs.wait(job_id, timeout=args.timeout, progress=not args.json and sys.stderr.isatty())
    except JobFailedError as e:
        _show(args, e.job, _job_detail(e.job))
        err.print(f"error: {e}", markup=False)
        return EXIT_JOB_FAILED
    except WaitTimeout as e:
        _show(args, e.job, _job_detail(e.job))
        err.print(f"error: {e}", markup=False)
        return EXIT_TIMEOUT
    _show(args, job, _job_detail(job))
    for w in job.warnings:
        err.print(f"warning: {w.message}", style="bold yellow", markup=False)
    return EXIT_OK


def _logs(args: argparse.Namespace, client: Distillery) -> int:
    def line(e) -> str:
        when = e.created_at.strftime("%H:%M:%S") if e.created_at else ""
        return f"{e.id:>6}  {when}  {e.kind:<14} {e.message or ''}"

    if not args.follow:
        events = client.jobs.events(args.id)
        _show(args, events, "\n".join(line(e) for e in events))
        return EXIT_OK
    for event in client.jobs.stream_events(args.id):
        if args.json:
            print(json.dumps(_dump(event), default=str), flush=True)  # one object per line while following
        else:
            out.print(line(event))
    return EXIT_OK if client.jobs.get(args.id).status == "succeeded" else EXIT_JOB_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code in (0, None) else EXIT_USAGE
    for name, default in (("json", False), ("base_url", None), ("api_key", None), ("profile", None)):
        setattr(args, name, getattr(args, name, default))
    try:
        with Distillery(args.base_url, args.api_key, profile=args.profile) as client:
            return _run(args, client)
    except APIError as e:
        err.print(f"error: {e.status}: {e.one_line()}", markup=False)
        return EXIT_ERROR
    except APIConnectionError as e:
        err.print(f"error: cannot reach the server: {e}", markup=False)
        return EXIT_UNREACHABLE
    except (DistilleryError, OSError) as e:
        err.print(f"error: {' '.join(str(e).split())}", markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
