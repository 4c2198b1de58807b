"""The progress display `wait(progress=True)` and `distillery submit --wait` show: one line that fits the
terminal (80 columns included), with the job's events printed above it.

    distill job job_0190c3e2a1b20000a1b2c3d4
    running ━━━━━━━━━━━━━╸━━━━━━━━━  120/200  loss 2.31  val KL 0.512  340 tok/s  ETA 0:01:02

What always stays: the status, the bar, step/total, the rate and the ETA; when the line would not fit, the
elapsed time goes first, then the val KL, then the loss. A queued job says which jobs it waits
on (`waiting_on`); a teacher cache counts tokens, a benchmark its work units.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.progress import Progress, ProgressColumn, Task
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .types import Event, JobState

# events about the result the user must not miss
_EVENT_STYLES = {"warning": "bold yellow", "rollback": "yellow", "diverged": "bold red", "guard": "yellow"}
MIN_BAR = 8


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    seconds = int(seconds)
    return f"ETA {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _count(n: float) -> str:
    """12, 12.3K, 4.5M: short enough for a status line."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e4)):
        if abs(n) >= size:
            return f"{n / (size if unit != 'K' else 1e3):.1f}{unit}"
    return f"{n:.0f}"


def waiting_text(state: Any) -> str:
    """'waiting on teacher_cache job_… (41%)': the jobs a queued job waits for, or ''."""
    waiting = getattr(state, "waiting_on", None) or []
    parts = []
    for w in waiting:
        pct = f" {w.fraction:.0%}" if w.fraction is not None else ""
        parts.append(f"{w.kind} {w.id} {w.status}{pct}")
    return ("waiting on " + ", ".join(parts)) if parts else ""


def status_line(kind: str, state: JobState, width: int, rate: float | None = None, elapsed: float | None = None):
    """The renderable of one state, at most `width` columns wide."""
    p, s = state.progress, state.summary
    status = state.status
    if status == "queued":
        return Text(f"queued  {waiting_text(state) or 'for a worker'}", overflow="ellipsis", no_wrap=True)
    total = p.total_steps
    counts = f"{_count(p.step)}/{_count(total)}" if total else (_count(p.step) if p.step else "")
    unit = "tok/s" if kind in ("distill", "teacher_cache") else "/s"
    speed = s.get("tokens_per_second") if kind == "distill" else rate
    must = [counts] if counts else []
    if speed:
        must.append(f"{_count(speed)} {unit}")
    if status == "running":
        must.append(_fmt_eta(p.eta_seconds))
    optional = []  # dropped from the end first
    if s.get("loss") is not None:
        optional.append(f"loss {s['loss']:.4g}")
    if s.get("val_kl") is not None:
        optional.append(f"val KL {s['val_kl']:.4g}")
    if elapsed is not None:
        optional.append(f"{int(elapsed) // 60}:{int(elapsed) % 60:02d} elapsed")
    while True:
        tail = "  ".join(must + optional)
        bar = width - len(status) - len(tail) - 4  # a space after the status, two before the tail, one spare
        if bar >= MIN_BAR or not optional:
            break
        optional.pop()  # the elapsed time first, then the val KL, then the loss
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    fraction_total = float(total) if total else None
    bar_width = max(MIN_BAR, min(bar, 40))
    grid.add_row(
        Text(status, style="bold"),
        ProgressBar(total=fraction_total, completed=float(p.step), width=bar_width),
        Text(" " + tail),
    )
    return grid


class _StateColumn(ProgressColumn):
    """The whole line as one column, built to the console's width."""

    def __init__(self, bar: JobProgress) -> None:
        super().__init__()
        self.bar = bar

    def render(self, task: Task) -> RenderableType:
        return self.bar.render()


class JobProgress:
    """A context manager; `update()` with each state, `event()` with each event. Disabled, it does nothing."""

    def __init__(self, job_id: str, kind: str, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.job_id, self.kind = job_id, kind
        self.state: JobState | None = None
        self._t0 = time.monotonic()
        self._rate: float | None = None
        self._last: tuple[float, int] | None = None
        self._progress: Progress | None = None
        if enabled:
            self.console = console or Console(stderr=True)
            self._progress = Progress(_StateColumn(self), console=self.console, transient=False)
            self._task = self._progress.add_task("", total=None)

    def render(self) -> RenderableType:
        head = Text(f"{self.kind} job {self.job_id}", style="dim", overflow="ellipsis", no_wrap=True)
        if self.state is None:
            return Group(head, Text("waiting for the first state"))
        width = max(40, self.console.width - 1)
        line = status_line(self.kind, self.state, width, self._rate, time.monotonic() - self._t0)
        return Group(head, line)

    def __enter__(self) -> JobProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.refresh()
            self._progress.stop()

    def update(self, state: JobState) -> None:
        if not self._progress:
            return
        now, step = time.monotonic(), state.progress.step
        if self._last is not None and step > self._last[1] and now > self._last[0]:
            rate = (step - self._last[1]) / (now - self._last[0])  # work units a second, smoothed
            self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
        if self._last is None or step != self._last[1]:
            self._last = (now, step)
        self.state = state
        self._progress.update(self._task, completed=step, total=state.progress.total_steps)

    def event(self, event: Event) -> None:
        if self._progress and event.message:
            style = _EVENT_STYLES.get(event.kind)
            message = f"[{style}]{escape(event.message)}[/{style}]" if style else escape(event.message)
            self._progress.console.print(f"[dim]{event.kind:<14}[/dim] {message}", highlight=False)
