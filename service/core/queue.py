"""The Celery app as both sides see it: the API sends `distillery.run_job`, the worker defines it.

Configured for jobs that run for hours: a message is acknowledged only after the task returns (late acks),
each worker process holds one message at a time (prefetch 1), a message whose worker died is requeued
(reject on worker lost). The broker is only a doorbell: the database row says what a job is and whether it
still needs running, so a duplicate or lost message is harmless (see service.core.lifecycle).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from service.core.settings import get_settings

log = logging.getLogger(__name__)
RUN_JOB = "distillery.run_job"
QUEUE = "distillery"


def make_celery(broker_url: str) -> Celery:
    app = Celery("distillery", broker=broker_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=False,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(broker_url),
        broker_pool_limit=4,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def transport_options(broker_url: str) -> dict:
    """Options for the broker's transport; each transport accepts only its own (SQLAlchemy's passes them all
    to `create_engine`, so Redis's `visibility_timeout` would break it)."""
    if broker_url.startswith(("sqla+", "sqlalchemy+")):
        # the embedded broker: a SQLite file shared by the API and the worker processes
        return {"connect_args": {"timeout": 30}} if "sqlite" in broker_url else {}
    if broker_url.startswith(("redis", "rediss", "sentinel")):
        return {
            # Redis redelivers an unacknowledged message after this; jobs can run for hours, and the
            # database lease (not the broker) is what detects a dead worker, so make it long.
            "visibility_timeout": 12 * 3600,
            "max_retries": 1,  # publishing: fail fast when the broker is down; the sweeper retries
        }
    return {"max_retries": 1}


@lru_cache
def celery_app() -> Celery:
    return make_celery(get_settings().broker_url)


def send(job_id: str, app: Celery | None = None) -> bool:
    """Hand a job to the broker; False (logged) when the broker is unreachable — the sweeper sends it later.

    `app`: a Celery app of its own (the API builds one from its settings); default: the process-wide one.
    """
    try:
        (app or celery_app()).send_task(RUN_JOB, args=[job_id], retry=False)
        return True
    except Exception as e:  # kombu raises several connection error types
        log.warning("could not enqueue %s (broker unreachable?): %s", job_id, e)
        return False


EPOCH_KEY = "distillery:broker-epoch"


def broker_restarted(app: Celery | None = None) -> bool:
    """Whether the broker lost its data since a sweeper last looked: a Redis that restarted empty drops every
    queued message with it. Sweepers keep a marker key there; the one that finds it missing (and sets it
    again, atomically: SET NX) says so, exactly once per loss. On a broker's first start the marker is missing
    too: the queued jobs are then sent once more, harmlessly. Always False for other brokers."""
    url = (app or celery_app()).conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return False
    import secrets

    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        return bool(client.set(EPOCH_KEY, secrets.token_hex(8), nx=True))
    except redis.RedisError:  # unreachable now: the sweep goes on (requeues need no broker); next round asks again
        return False
    finally:
        client.close()


def broker_ok(app: Celery | None = None) -> bool:
    try:
        with (app or celery_app()).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
