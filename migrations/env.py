"""Alembic environment: the database URL comes from the settings (DISTILLERY_DATABASE_URL) unless given."""

from alembic import context

from service.core.db.models import Base
from service.core.db.session import make_engine

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from service.core.settings import get_settings

        url = get_settings().database_url
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as connection:
        # batch mode: SQLite can only alter tables by copying them, Alembic does that for us
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
