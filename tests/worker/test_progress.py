"""Every job kind's progress goes through `JobRecorder.progress` (worker/recorder.py): step of total and an ETA,
the run's own (training) or, when it gives none (a teacher cache's tokens, a benchmark's work units), one from
the pace of the reports themselves."""

from __future__ import annotations

import time

import pytest

from worker.recorder import JobRecorder, Pace


def test_pace_is_the_time_per_unit_since_the_first_report_times_what_is_left():
    pace = Pace()
    assert pace.eta(0, 100, now=10.0) is None  # nothing done yet: no pace
    assert pace.eta(25, 100, now=20.0) == pytest.approx(30.0)  # 25 units in 10 s: 75 left take 30 s
    assert pace.eta(50, 100, now=30.0) == pytest.approx(20.0)
    assert pace.eta(100, 100, now=31.0) == 0.0
    assert pace.eta(5, None, now=32.0) is None  # no total, no ETA
    assert pace.eta(10, 20, now=40.0) is None  # another count (a new total) starts over
    assert pace.eta(15, 20, now=45.0) == pytest.approx(5.0)
    assert pace.eta(2, 20, now=46.0) is None  # a count going back (a resumed run) starts over too


def test_the_recorder_fills_in_an_eta_only_when_the_run_gives_none():
    recorder = JobRecorder("job_x", flush_seconds=1e9)  # nothing is flushed in this test
    recorder.progress({"step": 0, "total_steps": 1000})
    assert recorder._progress == {"progress_step": 0, "total_steps": 1000, "eta_seconds": None}
    time.sleep(0.05)
    recorder.progress({"step": 100, "total_steps": 1000})
    assert recorder._progress is not None and recorder._progress["eta_seconds"] > 0.3  # >= 0.05 s x 9
    recorder.progress({"step": 200, "total_steps": 1000, "eta_seconds": 12.5})  # a training run's own ETA
    assert recorder._progress["eta_seconds"] == 12.5
