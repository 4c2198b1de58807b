"""What a run reports, persisted: the engine's hooks (events, metrics, checkpoints, progress) → database rows.

Writes are buffered and flushed in short transactions (never one held open during compute): events at once
(they are few) except `cache_progress`, which is kept to one every few seconds; step metrics and progress at
most every `flush_seconds`, and always before an evaluation, a checkpoint or the end of the run. A failed flush
(database briefly away) keeps its buffer for the next one, so the run itself never fails on reporting.

Every write is fenced by the lease: its transaction begins with `lifecycle.fence` (the owner check, as a row
lock), so a worker that lost its lease while frozen writes nothing more, and `on_lost` tells the run to stop.
A metric row is unique per (job, kind, step, name), so even a write that slipped through is never counted twice.

The metrics rows mirror the run's `metrics.jsonl`: when a run starts or resumes, `sync_to_checkpoint` drops the
rows past the checkpoint it resumes from (the steps it will run again) and adds the ones a killed worker logged
to the file but never flushed, so no step is missing or counted twice.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.core import lifecycle
from service.core.db.models import Checkpoint, Job, JobEvent, StepMetric
from service.core.db.session import session_scope

log = logging.getLogger(__name__)

NOT_METRICS = {"step", "kind"}


def jsonable(value: Any) -> Any:
    """A JSON (and JSONB) safe copy: non-finite floats become null, numpy scalars and paths plain values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy / mlx scalars
        return jsonable(value.item())
    return str(value)


def metric_rows(job_id: str, record: dict) -> list[dict]:
    """StepMetric rows (as dicts, for a bulk insert): one per finite numeric field of a train/eval record."""
    return [
        dict(job_id=job_id, step=int(record["step"]), kind=record["kind"], name=name, value=float(value))
        for name, value in record.items()
        if name not in NOT_METRICS
        and not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
    ]


class LeaseLost(Exception):
    """A fenced write found the lease held by another worker (or the job over): nothing was written."""


def fenced(session: Session, job_id: str, owner: str | None) -> None:
    """Start a write transaction of the lease owner (no owner: an unfenced write, e.g. a local run's)."""
    if owner is not None and not lifecycle.fence(session, job_id, owner):
        raise LeaseLost(f"job {job_id}: the lease is no longer held by {owner}")


def insert_metrics(session: Session, rows: list[dict]) -> None:
    """Insert metric rows; one already there (same job, kind, step and name) is left as it is."""
    if not rows:
        return
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    session.execute(
        dialect.insert(StepMetric).on_conflict_do_nothing(index_elements=["job_id", "kind", "step", "name"]), rows
    )


class Pace:
    """An ETA from the progress reports themselves: the time per unit since the first report of this count
    (a new total, or a count going back, starts over), times the units left."""

    def __init__(self) -> None:
        self._start: tuple[float, int, int | None] | None = None  # (time, step, total)

    def eta(self, step: int, total: int | None, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if not total:
            return None
        if self._start is None or self._start[2] != total or step < self._start[1]:
            self._start = (now, step, total)
        t0, s0, _ = self._start
        if step >= total:
            return 0.0
        if step <= s0 or now <= t0:
            return None
        return (now - t0) / (step - s0) * (total - step)


class JobRecorder:
    def __init__(
        self,
        job_id: str,
        owner: str | None = None,
        on_lost: Callable[[str], None] | None = None,
        flush_seconds: float = 2.0,
        progress_event_seconds: float = 3.0,
    ):
        self.job_id, self.owner, self.on_lost = job_id, owner, on_lost
        self.flush_seconds, self.progress_event_seconds = flush_seconds, progress_event_seconds
        self._events: list[tuple[str, str, dict]] = []
        self._metrics: list[dict] = []
        self._progress: dict | None = None
        self._latest: dict = {}
        self._summary_dirty = False
        self._last_flush = time.monotonic()
        self._last_progress_event = -math.inf
        self._pace = Pace()

    # -- the engine's hooks
    def event(self, kind: str, message: str, data: dict) -> None:
        if kind == "cache_progress":
            now = time.monotonic()
            if now - self._last_progress_event < self.progress_event_seconds and data.get("done") != data.get("total"):
                return
            self._last_progress_event = now
            self._events.append((kind, message, jsonable(data)))
            self.maybe_flush()
            return
        self._events.append((kind, message, jsonable(data)))
        self.flush()

    def metrics(self, record: dict) -> None:
        self._metrics.extend(metric_rows(self.job_id, record))
        self._latest.update({k: v for k, v in record.items() if k != "kind"})
        self._summary_dirty = True
        if record.get("kind") == "eval":
            self.flush()
        else:
            self.maybe_flush()

    def progress(self, record: dict) -> None:
        """The job's progress: `step` of `total_steps` (training steps, a cache's tokens, a benchmark's work
        units) and `eta_seconds`; every kind reports through here. Without an ETA from the run, it is the
        pace since this attempt's first report of this count times what is left (the API adds `fraction`)."""
        step, total = int(record["step"]), record.get("total_steps")
        eta = record.get("eta_seconds")
        if eta is None:
            eta = self._pace.eta(step, total)
        self._progress = {"progress_step": step, "total_steps": total, "eta_seconds": jsonable(eta)}
        self.maybe_flush()

    def checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        try:
            sync_checkpoints(self.job_id, path.parent, self.owner)
        except LeaseLost as e:
            self._lost(str(e))
        except Exception as e:  # the rows are synced again at the next checkpoint and at the end
            log.warning("job %s: could not record checkpoint %d: %s", self.job_id, step, e)

    # -- writing
    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> bool:
        self._last_flush = time.monotonic()
        if not (self._events or self._metrics or self._progress or self._summary_dirty):
            return True
        values = dict(self._progress or {})
        if self._summary_dirty:
            values["summary"] = jsonable(self._latest)
        try:
            with session_scope() as session:
                fenced(session, self.job_id, self.owner)
                session.add_all(JobEvent(job_id=self.job_id, kind=k, message=m, data=d) for k, m, d in self._events)
                insert_metrics(session, self._metrics)
                if values:
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id)
                        .values(**values)
                        .execution_options(synchronize_session=False)
                    )
        except LeaseLost as e:
            self._lost(str(e))
            self._events, self._metrics, self._progress, self._summary_dirty = [], [], None, False
            return False
        except Exception as e:
            log.warning("job %s: could not record progress (kept for the next try): %s", self.job_id, e)
            return False
        self._events, self._metrics, self._progress, self._summary_dirty = [], [], None, False
        return True

    def _lost(self, why: str) -> None:
        log.warning("%s; this run's reports are dropped", why)
        if self.on_lost:
            self.on_lost(why)


def latest_checkpoint_step(out_dir: Path) -> int | None:
    """The step of the checkpoint a run in `out_dir` resumes from (as the engine chooses it), or None."""
    done = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return json.loads((done[-1] / "state.json").read_text())["step"] if done else None


def sync_to_checkpoint(job_id: str, out_dir: Path, owner: str | None = None) -> int | None:
    """Before a run starts or resumes: make the metric rows match what the run keeps (see module doc)."""
    step = latest_checkpoint_step(out_dir)
    with session_scope() as session:
        fenced(session, job_id, owner)
        if step is None:
            session.execute(delete(StepMetric).where(StepMetric.job_id == job_id))
            return None
        session.execute(delete(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > step))
        have = dict(
            session.execute(
                select(StepMetric.kind, func.max(StepMetric.step))
                .where(StepMetric.job_id == job_id)
                .group_by(StepMetric.kind)
            ).all()
        )
        metrics_file = out_dir / "metrics.jsonl"
        if metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                record = json.loads(line) if line.strip() else None
                if record and have.get(record["kind"], -1) < record["step"] <= step:
                    insert_metrics(session, metric_rows(job_id, record))
        write_checkpoint_rows(session, job_id, out_dir / "checkpoints")
    return step


def sync_checkpoints(job_id: str, root: Path, owner: str | None = None) -> None:
    with session_scope() as session:
        fenced(session, job_id, owner)
        write_checkpoint_rows(session, job_id, root)


def write_checkpoint_rows(session: Session, job_id: str, root: Path) -> None:
    """Checkpoint rows = the resumable `step-N/` folders on disk (older ones are pruned by the engine)."""
    on_disk = {
        json.loads((p / "state.json").read_text())["step"]: p
        for p in root.glob("step-*")
        if (p / "state.json").is_file()
    }
    rows = {c.step: c for c in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id))}
    for step, row in rows.items():
        if step not in on_disk:
            session.delete(row)
        elif row.path != str(on_disk[step].resolve()):  # the same step, now in another attempt's folder
            row.path = str(on_disk[step].resolve())
    session.add_all(
        Checkpoint(job_id=job_id, step=step, path=str(path.resolve()))
        for step, path in on_disk.items()
        if step not in rows
    )
