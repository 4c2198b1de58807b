"""The worker's Celery app: service.core.queue's app (same configuration) with `distillery.run_job` registered.

`blas.enable()` runs first, before anything can import MLX (its BLAS symbols are bound when it loads), then
`cpu_jit.enable()` (the flags MLX's CPU compiler builds kernels with). Each
worker process also runs a sweeper thread (started when the worker is ready) and, on a warm shutdown
(SIGTERM, Ctrl-C), asks its running job to checkpoint and give itself back to the queue.

    celery -A worker.celery_app worker --pool solo        # or: distillery-server worker
"""

from __future__ import annotations

from worker.engine import blas, cpu_jit

blas.enable()
cpu_jit.enable()  # before MLX compiles a kernel: vectorised CPU kernels (cpu_jit.py)

import logging  # noqa: E402

from celery import signals  # noqa: E402

from service.core.queue import QUEUE, RUN_JOB, celery_app  # noqa: E402
from service.core.settings import get_settings  # noqa: E402
from worker import lease, tasks  # noqa: E402
from worker.sweeper import Sweeper  # noqa: E402

log = logging.getLogger(__name__)

app = celery_app()
run_job = app.task(name=RUN_JOB, ignore_result=True)(tasks.run_job)
_sweeper: Sweeper | None = None


@signals.worker_ready.connect
def _start_sweeper(**_: object) -> None:
    global _sweeper
    settings = get_settings()
    _sweeper = Sweeper(settings.sweep_seconds, settings.enqueue_grace_seconds)
    _sweeper.start()
    log.info("worker ready: database %s, sweeping every %ss", _redact(settings.database_url), settings.sweep_seconds)


@signals.worker_shutting_down.connect
def _shutting_down(**_: object) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    lease.shutdown_all()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def start_worker(
    concurrency: int = 1, loglevel: str = "info", pool: str | None = None, hostname: str | None = None
) -> None:
    """Run a worker in this process until it is shut down. `solo` (the default with concurrency 1) runs the
    job in this process: no fork after start-up, which MLX's Metal backend needs, and a warm shutdown releases
    the running job at its next step. `prefork` runs `concurrency` jobs in child processes; its warm shutdown
    waits for the running jobs to end (a killed child's job is resumed elsewhere once its lease expires)."""
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    pool = pool or ("solo" if concurrency == 1 else "prefork")
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={QUEUE}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    """A prefork child must not share the parent's pooled database connections."""
    from service.core.db.session import engine_for

    engine_for(get_settings().database_url).dispose(close=False)
