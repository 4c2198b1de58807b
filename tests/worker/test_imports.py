"""The worker's module boundaries: no HTTP layer in a worker, no MLX before `blas.enable()`, one Celery config."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import worker.celery_app, worker.tasks, worker.runs, worker.recorder, worker.resolve, worker.lease, worker.sweeper
from worker.engine import blas
http = [m for m in sys.modules if m.startswith(("litestar", "uvicorn", "service.http.app", "service.http"))]
assert not http, http
assert blas.enable() == blas._result and "already imported" not in blas._result, blas._result
from worker.celery_app import app
from service.core.queue import RUN_JOB, celery_app
assert app is celery_app() and RUN_JOB in app.tasks
conf = app.conf
assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
print("ok")
"""


def test_worker_imports_no_http_layer_and_registers_run_job():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
