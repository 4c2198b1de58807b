"""`distillery-server`: the server-side command line (the `[project.scripts]` entry of pyproject.toml): the
database migration, the API and the worker, API keys, and the local engine commands (import-gguf, distill,
demo, dev).

Commands import their heavy modules lazily, so `distillery-server --help` and the API never load MLX.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click


@click.group()
def main() -> None:
    """Distillery server: API, worker, and local engine commands."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" notice: MLX needs none


@main.command("migrate")
def migrate_cmd() -> None:
    """Upgrade the database (DISTILLERY_DATABASE_URL) to the latest schema."""
    from service.core.db.migrate import upgrade
    from service.core.settings import get_settings

    upgrade(get_settings().database_url)
    click.echo("database at the latest schema")


@main.command("api")
@click.option("--host", default=None, help="Default: DISTILLERY_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: DISTILLERY_PORT (8000).")
def api_cmd(host: str | None, port: int | None) -> None:
    """Serve the HTTP API (run `migrate` first)."""
    import uvicorn

    from service.core.settings import get_settings
    from service.http.app import create_app
    from service.http.logs import UVICORN_LOG_CONFIG

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        proxy_headers=True,
        timeout_graceful_shutdown=5,
        log_config=UVICORN_LOG_CONFIG,
    )


@main.group("keys")
def keys_group() -> None:
    """API keys: one project per key; only the key's hash is stored."""


@keys_group.command("create")
@click.option("--project", "project_name", required=True, help="Project name (created if it does not exist).")
def keys_create_cmd(project_name: str) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    from service.core.db.session import session_scope
    from service.core.settings import get_settings
    from service.http.auth import create_api_key

    url = get_settings().database_url
    _ensure_schema(url)
    with session_scope(url) as session:
        row, key = create_api_key(session, project_name)
        project_id = row.project_id
    click.echo(f"project {project_name} ({project_id}), key id {row.id}; store the key now, it is not shown again:")
    click.echo(key)


@keys_group.command("revoke")
@click.argument("key_id_or_prefix")
def keys_revoke_cmd(key_id_or_prefix: str) -> None:
    """Revoke a key by its id (key_...) or its prefix (the part after `dst_`)."""
    from service.core.db.session import session_scope
    from service.http.auth import revoke_api_key

    with session_scope() as session:
        count = revoke_api_key(session, key_id_or_prefix)
    if not count:
        raise click.ClickException(f"no active key {key_id_or_prefix!r}")
    click.echo(f"revoked {count} key(s)")


def _ensure_schema(url: str) -> None:
    """The embedded SQLite database is created on first use; a server database is `migrate`d explicitly."""
    from sqlalchemy import inspect

    from service.core.db.session import engine_for

    if "projects" in inspect(engine_for(url)).get_table_names():
        return
    if url.startswith("sqlite"):
        from service.core.db.migrate import upgrade

        upgrade(url)
        return
    raise click.ClickException("the database has no schema yet: run `distillery-server migrate` first")


@main.command("import-gguf")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
def import_gguf_cmd(src: Path, out: Path, dtype: str) -> None:
    """Convert the GGUF model SRC into an mlx-lm folder OUT (weights, config, tokenizer, chat template)."""
    from worker.engine.errors import UserError
    from worker.engine.gguf_import import import_gguf

    try:
        info = import_gguf(src, out, dtype=dtype)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"imported {src} -> {out} ({info})")


@main.command("distill")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Teacher caches and imported models (default: ~/.cache/distillery).",
)
@click.option("--no-progress", is_flag=True, help="Plain log lines instead of a progress bar.")
def distill_cmd(config: Path, out_dir: Path, cache_dir: Path | None, no_progress: bool) -> None:
    """Run one distill spec (YAML: `kind: distill` + `spec`, or the spec alone) locally, without API or queue."""
    from worker.engine import blas, cpu_jit, cpu_memory

    click.echo(f"[blas] {blas.enable()}", err=True)
    click.echo(f"[cpu_jit] {cpu_jit.enable()}", err=True)
    click.echo(f"[cpu_memory] {cpu_memory.enable()}", err=True)
    from worker.engine.errors import UserError
    from worker.engine.local import run_local

    try:
        run_local(config, out_dir, cache_dir=cache_dir, progress=not no_progress)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command("demo")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--steps", type=int, default=40, show_default=True)
def demo_cmd(work: Path, steps: int) -> None:
    """SmolLM2-135M teaches a 24-layer student on Shakespeare; distillation vs plain SFT, before and after."""
    from service.commands.demo import choose_blas_threads

    choose_blas_threads()  # before OpenBLAS loads: in this process and in the dev server it starts
    from worker.engine import blas, cpu_jit

    print(blas.enable())
    print(cpu_jit.enable())
    from service.commands.demo import run_demo

    run_demo(work, steps=steps)


@main.command("worker")
@click.option("--concurrency", type=int, default=1, show_default=True, help="Jobs run at once by this worker.")
@click.option(
    "--pool",
    type=click.Choice(["solo", "prefork"]),
    default=None,
    help="solo (default with concurrency 1): jobs run in this process; prefork: in child processes.",
)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default: celery@<host>).")
def worker_cmd(concurrency: int, pool: str | None, loglevel: str, hostname: str | None) -> None:
    """Run a worker: takes jobs from the broker (DISTILLERY_BROKER_URL), records them in the database."""
    if concurrency < 1:
        raise click.BadParameter("must be at least 1", param_hint="--concurrency")
    if pool == "solo" and concurrency > 1:
        raise click.BadParameter("the solo pool runs one job at a time; use --pool prefork", param_hint="--concurrency")
    from worker.celery_app import start_worker  # enables OpenBLAS before anything imports MLX

    start_worker(concurrency=concurrency, loglevel=loglevel, pool=pool, hostname=hostname)


@main.command("dev")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--project", default="default", show_default=True, help="Project of a newly created API key.")
@click.option("--new-key", is_flag=True, help="Print a new API key even when keys exist already.")
def dev_cmd(host: str, port: int, project: str, new_key: bool) -> None:
    """API + one worker on the embedded default (SQLite, a broker in SQLite): nothing else to run."""
    from service.commands.dev import run_dev

    run_dev(host, port, project, new_key)


if __name__ == "__main__":
    main()
