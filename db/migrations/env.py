"""Alembic environment: migrates `db.models.Base.metadata`, from code or from the CLI.

From code (`db.session.ensure_schema`) a connection arrives in `config.attributes`, already in
a transaction. From the CLI the database comes from `-x url=...` or `sqlalchemy.url`.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from db.session import make_engine, migration_options

config = context.config


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit(
            "no database: pass -x url=postgresql+psycopg://... or -x url=sqlite:///..."
        )
    return url


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (`alembic upgrade head --sql`)."""
    context.configure(url=_database_url(), literal_binds=True, **migration_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, or on a new one from the URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **migration_options())
        with context.begin_transaction():
            context.run_migrations()
        return
    # From the CLI only: let alembic.ini's logging sections show what runs.
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(_database_url())
    try:
        with engine.connect() as new_connection:
            context.configure(connection=new_connection, **migration_options())
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
