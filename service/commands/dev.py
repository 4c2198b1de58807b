"""`distillery-server dev`: the API and one worker on the embedded default, in one command.

The embedded default needs no server: the database is a SQLite file (DISTILLERY_DATABASE_URL, else the
settings' default) and the broker is kept by kombu's SQLAlchemy transport in a SQLite file beside it. The
command migrates the database (never resets it), makes sure an API key exists (printing a new one only when
there is none, or with `--new-key`), then serves the API in this process and runs `distillery-server worker`
as a child with the same environment. Ctrl-C or SIGTERM stops both; the worker checkpoints its running job
and gives it back to the queue, to be resumed by the next `dev`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

WORKER_STOP_SECONDS = 60


def embedded_broker_url(database_url: str) -> str | None:
    """A SQLite broker file beside a SQLite database file, so separate `dev` instances never share a queue."""
    if not database_url.startswith("sqlite:///"):
        return None
    db = Path(database_url.removeprefix("sqlite:///")).expanduser()
    if str(db) in ("", ":memory:"):
        return None
    return f"sqla+sqlite:///{db.with_name(db.stem + '-broker.db')}"


def dev_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment shared by the API and the worker: database and broker stated explicitly."""
    from service.core.settings import Settings

    env = dict(environ)
    database_url = env.get("DISTILLERY_DATABASE_URL") or Settings().database_url
    env["DISTILLERY_DATABASE_URL"] = database_url
    if not env.get("DISTILLERY_BROKER_URL"):
        env["DISTILLERY_BROKER_URL"] = embedded_broker_url(database_url) or Settings().broker_url
    return env


def ensure_key(database_url: str, project: str, new_key: bool) -> str | None:
    """A new API key when asked or when the database has no active key; None when keys exist already."""
    from sqlalchemy import select

    from service.core.db.models import ApiKey
    from service.core.db.session import session_scope
    from service.http.auth import create_api_key

    with session_scope(database_url) as session:
        if not new_key and session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)):
            return None
        return create_api_key(session, project)[1]


def _die_with_parent() -> None:
    """In the worker child (Linux): get SIGTERM if `dev` itself is killed, so no worker is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProcess:
    """`distillery-server worker` as a child, restarted if it dies while `dev` runs."""

    def __init__(self, env: dict[str, str]):
        self.env, self.stopping = env, False
        self.proc: subprocess.Popen[bytes] | None = None
        self._watch = threading.Thread(target=self._watchdog, daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watch.start()

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "service.commands.cli", "worker", "--loglevel", "info"]
        self.proc = subprocess.Popen(
            cmd, env=self.env, preexec_fn=_die_with_parent if sys.platform == "linux" else None
        )

    def _watchdog(self) -> None:
        while not self.stopping and self.proc is not None:
            code = self.proc.wait()
            if self.stopping:
                return
            click.echo(f"[dev] worker exited with {code}; starting another in 2s", err=True)
            time.sleep(2)
            if not self.stopping:
                self._spawn()

    def stop(self) -> None:
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # warm shutdown: the running job checkpoints and is released
        try:
            self.proc.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_dev(host: str, port: int, project: str, new_key: bool) -> None:
    env = dev_environment(dict(os.environ))
    os.environ.update({k: env[k] for k in ("DISTILLERY_DATABASE_URL", "DISTILLERY_BROKER_URL")})
    from service.core.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    try:
        from service.http.app import create_app
    except ImportError as e:
        raise click.ClickException(f"the HTTP API is not available in this installation: {e}") from None
    from service.core.db.migrate import upgrade

    upgrade(settings.database_url)
    key = ensure_key(settings.database_url, project, new_key)
    app = create_app(settings)

    url = f"http://{host}:{port}"
    click.echo(f"Distillery dev: API {url} (OpenAPI at {url}/schema)")
    click.echo(
        f"  database  {settings.database_url}\n  broker    {settings.broker_url}\n  artifacts {settings.artifact_root}"
    )
    if key:
        click.echo(f"API key for project {project!r} (shown once; export DISTILLERY_API_KEY=...):")
        click.echo(key)
    else:
        click.echo("using the existing API keys (`distillery-server dev --new-key` prints a new one)")
    sys.stdout.flush()

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    worker = WorkerProcess(env)
    worker.start()
    try:
        import uvicorn

        from service.http.logs import UVICORN_LOG_CONFIG

        uvicorn.run(
            app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, log_config=UVICORN_LOG_CONFIG
        )
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("[dev] stopping the worker", err=True)
        worker.stop()
