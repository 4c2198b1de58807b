"""`distillery-server`: the server-side command line (SPEC §2).

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
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Teacher caches and imported models (default: ~/.cache/distillery).")
@click.option("--no-progress", is_flag=True, help="Plain log lines instead of a progress bar.")
def distill_cmd(config: Path, out_dir: Path, cache_dir: Path | None, no_progress: bool) -> None:
    """Run one distill spec (YAML: `kind: distill` + `spec`, or the spec alone) locally, without API or queue."""
    from worker.engine import blas

    click.echo(f"[blas] {blas.enable()}", err=True)
    from worker.engine.errors import UserError
    from worker.engine.local import run_local

    try:
        run_local(config, out_dir, cache_dir=cache_dir, progress=not no_progress)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@main.command("demo")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--steps", type=int, default=60, show_default=True)
def demo_cmd(work: Path, steps: int) -> None:
    """SmolLM2-135M teaches a half-depth student on Shakespeare; distillation vs plain SFT, before and after."""
    from worker.engine import blas

    print(blas.enable())
    from worker.demo import run_demo

    run_demo(work, steps=steps)


if __name__ == "__main__":
    main()
