"""Run Alembic programmatically: `distillery-server migrate` and the tests use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    # __path__, not __file__: an editable install made before migrations/ had an __init__.py maps it as a
    # namespace package, which has no __file__
    cfg.set_main_option("script_location", str(Path(next(iter(migrations.__path__)))))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
