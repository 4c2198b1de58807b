"""`distillery` command line: exit 0 ok, 1 API/client error, 2 usage, 3 job failed (--wait)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel

from ._base import APIError, DistilleryError, JobFailedError
from ._client import Distillery


def _dump(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    return obj


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(_dump(obj), indent=2, default=str) if args.json else text)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    S = argparse.SUPPRESS   # so a flag given before the subcommand is not reset by the subcommand's default
    common.add_argument("--json", action="store_true", default=S, help="print the object(s) as JSON")
    common.add_argument("--base-url", default=S, help="default: $DISTILLERY_BASE_URL")
    common.add_argument("--api-key", default=S, help="default: $DISTILLERY_API_KEY")
    p = argparse.ArgumentParser(prog="distillery", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("datasets", parents=[common]).add_subparsers(dest="action", required=True)
    up = ds.add_parser("upload", parents=[common])
    up.add_argument("file")
    up.add_argument("--name")
    up.add_argument("--format")
    ds.add_parser("list", parents=[common])
    ms = sub.add_parser("models", parents=[common]).add_subparsers(dest="action", required=True)
    add = ms.add_parser("add", parents=[common])
    add.add_argument("path")
    add.add_argument("--name")
    ms.add_parser("list", parents=[common])
    s = sub.add_parser("submit", parents=[common])
    s.add_argument("file")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--poll", type=float, default=2.0)
    j = sub.add_parser("jobs", parents=[common])
    j.add_argument("--status")
    j.add_argument("--kind")
    for name in ("status", "logs", "metrics", "cancel"):
        c = sub.add_parser(name, parents=[common])
        c.add_argument("id")
    d = sub.add_parser("download", parents=[common])
    d.add_argument("id")
    d.add_argument("--out", required=True)
    return p


def _job_line(job: Any) -> str:
    prog = job.progress or {}
    step = f" step {prog.get('step')}/{prog.get('total_steps')}" if prog.get("total_steps") else ""
    err = f" error: {job.error.get('code')}: {job.error.get('message')}" if job.error else ""
    return f"{job.id}  {job.kind:<13} {job.status:<10}{step}{err}"


def _run(args: argparse.Namespace, client: Distillery) -> int:
    cmd = args.command
    if cmd == "datasets" and args.action == "upload":
        ds = client.datasets.upload(args.file, name=args.name, format=args.format)
        _out(args, ds, f"{ds.id}  {ds.name}  {ds.format}  {ds.records} records")
    elif cmd == "datasets":
        items = client.datasets.list()
        _out(args, items, "\n".join(f"{d.id}  {d.name}  {d.format}  {d.records}" for d in items))
    elif cmd == "models" and args.action == "add":
        m = client.models.add(args.path, name=args.name)
        _out(args, m, f"{m.id}  {m.name}  {m.format}")
    elif cmd == "models":
        items = client.models.list()
        _out(args, items, "\n".join(f"{m.id}  {m.name}  {m.format}" for m in items))
    elif cmd == "submit":
        job = client.jobs.create(args.file)
        if args.wait:
            try:
                job = client.jobs.wait(job.id, poll=args.poll,
                                       on_update=None if args.json else lambda j: print(_job_line(j), file=sys.stderr))
            except JobFailedError as e:
                _out(args, e.job, _job_line(e.job))
                print(f"error: {e}", file=sys.stderr)
                return 3
        _out(args, job, _job_line(job))
    elif cmd == "jobs":
        items = list(client.jobs.list(status=args.status, kind=args.kind))
        _out(args, items, "\n".join(_job_line(j) for j in items))
    elif cmd == "status":
        job = client.jobs.get(args.id)
        _out(args, job, _job_line(job))
    elif cmd == "logs":
        events = client.jobs.events(args.id)
        _out(args, events, "\n".join(f"{e.id:>5} {e.kind:<12} {e.message or ''}" for e in events))
    elif cmd == "metrics":
        points = client.jobs.metrics(args.id)
        _out(args, points, "\n".join(f"{m.step:>6} {m.name:<20} {m.value:.6g}" for m in points))
    elif cmd == "cancel":
        job = client.jobs.cancel(args.id)
        _out(args, job, _job_line(job))
    elif cmd == "download":
        paths = client.artifacts.download(args.id, args.out)
        _out(args, [str(p) for p in paths], "\n".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    args.json = getattr(args, "json", False)
    args.base_url = getattr(args, "base_url", None)
    args.api_key = getattr(args, "api_key", None)
    try:
        with Distillery(args.base_url, args.api_key) as client:
            return _run(args, client)
    except APIError as e:
        fields = "; ".join(f"{x.get('field') or x.get('line')}: {x.get('message')}" for x in e.errors
                           if x.get("field") or x.get("line"))
        detail = e.detail if not fields or fields in e.detail else f"{e.detail} ({fields})"
        print(f"error: {e.status}: {detail}", file=sys.stderr)
        return 1
    except (DistilleryError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # httpx transport errors and the like: still one line
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
