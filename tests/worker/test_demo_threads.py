"""The demo picks its OpenBLAS thread count from how busy the machine is (it ran 3x slower oversubscribed)."""

from __future__ import annotations

import os

from service.commands import demo


def test_threads_follow_the_free_cores(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for busy, want in ((0.1, 4), (1.2, 3), (3.6, 1), (9.0, 1)):
        monkeypatch.setattr(demo, "_busy_cores", lambda seconds, busy=busy: busy)
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        assert demo.choose_blas_threads() == want and os.environ["OPENBLAS_NUM_THREADS"] == str(want)


def test_a_set_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setattr(demo, "_busy_cores", lambda seconds: 99.0)
    assert demo.choose_blas_threads() == 3


def test_busy_cores_reads_the_machine():
    busy = demo._busy_cores(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
