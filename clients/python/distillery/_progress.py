"""The progress bar `wait(progress=True)` and `distillery submit --wait` show: step/total, loss, tokens/s and
the server's ETA, with the job's events printed above it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .types import Event, JobState

# events about the result the user must not miss
_EVENT_STYLES = {"warning": "bold yellow", "rollback": "yellow", "diverged": "bold red", "guard": "yellow"}


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    seconds = int(seconds)
    return f"ETA {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """A context manager; `update()` with each state, `event()` with each event. Disabled, it does nothing."""

    def __init__(self, job_id: str, kind: str, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.job_id, self.kind = job_id, kind
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TextColumn("{task.fields[eta]}"),
                TimeElapsedColumn(),
                console=console or Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task(f"{kind} {job_id} queued", total=None, metrics="", eta="")

    def __enter__(self) -> JobProgress:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.stop()

    def update(self, state: JobState) -> None:
        if not self._progress:
            return
        p, s = state.progress, state.summary
        metrics = []
        if s.get("loss") is not None:
            metrics.append(f"loss {s['loss']:.4g}")
        if s.get("val_kl") is not None:
            metrics.append(f"val KL {s['val_kl']:.4g}")
        if s.get("tokens_per_second"):
            metrics.append(f"{s['tokens_per_second']:.0f} tok/s")
        self._progress.update(
            self._task,
            description=f"{self.kind} {self.job_id} {state.status}",
            completed=p.step,
            total=p.total_steps,
            metrics="  ".join(metrics),
            eta=_fmt_eta(p.eta_seconds) if state.status == "running" else "",
        )

    def event(self, event: Event) -> None:
        if self._progress and event.message:
            style = _EVENT_STYLES.get(event.kind)
            message = f"[{style}]{escape(event.message)}[/{style}]" if style else escape(event.message)
            self._progress.console.print(f"[dim]{event.kind:<14}[/dim] {message}", highlight=False)
