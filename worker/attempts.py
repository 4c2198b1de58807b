"""Each attempt at a job writes its files in a folder of its own; only the lease owner publishes them.

A worker frozen past its lease (SIGSTOP, a long GC pause, a VM migration) wakes up still running: before it
notices the lease is gone it may finish a step, append to `metrics.jsonl`, write a checkpoint. If all attempts
shared the job's folder, those writes would land in the new owner's run. So attempt N runs in

    <job dir>/.attempts/<N>/

starting from what the newest earlier attempt left there (its checkpoints hard-linked: they are written
under a temporary name, renamed, and only ever removed, never rewritten in place; its small files copied,
since `metrics.jsonl` is appended to). A stale attempt can only write into its own folder, which no later
attempt reads again. On success the owner moves the attempt's files into `<job dir>/` in the same
transaction that checks its lease and records the outcome (see `worker.tasks`), then removes `.attempts/`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ATTEMPTS = ".attempts"
LINKED = "checkpoints"  # resume state: hard-linked
COPY_MAX_BYTES = 64 << 20  # other files an attempt inherits are small (metrics, spec marker); big ones
# (the pruned `student/`, `fused/`, a benchmark's stores) are rebuilt


def attempt_dir(job_dir: Path, attempt: int) -> Path:
    return job_dir / ATTEMPTS / str(attempt)


def prepare(job_dir: Path, attempt: int) -> Path:
    """The folder attempt `attempt` works in, seeded from the newest earlier attempt (or, for a run started
    before attempts had folders, from the job folder itself)."""
    work = attempt_dir(job_dir, attempt)
    if work.exists():  # the same attempt number again cannot happen (claims count up), but never mix runs
        shutil.rmtree(work)
    source = _newest_before(job_dir, attempt)
    if source is None and (job_dir / LINKED).is_dir():
        source = job_dir
    work.mkdir(parents=True)
    if source is not None:
        _inherit(source, work)
        log.info("attempt %d of %s starts from %s", attempt, job_dir.name, source)
    return work


def publish(work: Path, job_dir: Path) -> None:
    """Move the attempt's files into the job folder (what its artifacts and later jobs read)."""
    for entry in sorted(work.iterdir()):
        target = job_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


def moved_paths(value: Any, work: Path, job_dir: Path) -> Any:
    """`value` (a run's summary) with the paths under `work` rewritten to where `publish` moved them."""
    if isinstance(value, dict):
        return {k: moved_paths(v, work, job_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [moved_paths(v, work, job_dir) for v in value]
    if isinstance(value, str) and (value == str(work) or value.startswith(str(work) + os.sep)):
        return str(job_dir) + value[len(str(work)) :]
    return value


def discard(job_dir: Path, up_to: int | None = None) -> None:
    """Remove the attempts' folders: all of them (after a success, its files are published), or those of
    attempts `up_to` and before (a failed attempt's own and the stale ones it started from, never a later
    attempt's: that one belongs to the worker that holds the job now)."""
    if up_to is None:
        shutil.rmtree(job_dir / ATTEMPTS, ignore_errors=True)
        return
    root = job_dir / ATTEMPTS
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name.isdigit() and int(folder.name) <= up_to:
            shutil.rmtree(folder, ignore_errors=True)


def _newest_before(job_dir: Path, attempt: int) -> Path | None:
    root = job_dir / ATTEMPTS
    if not root.is_dir():
        return None
    earlier = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) < attempt]
    return root / str(max(earlier)) if earlier else None


def _inherit(source: Path, work: Path) -> None:
    linked = source / LINKED
    if linked.is_dir():
        for path in linked.rglob("*"):
            if path.name.startswith(".tmp-") or any(p.startswith(".tmp-") for p in path.relative_to(linked).parts):
                continue  # a checkpoint its attempt never finished writing
            target = work / LINKED / path.relative_to(linked)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.stat().st_size <= COPY_MAX_BYTES:
            shutil.copy2(path, work / path.name)
