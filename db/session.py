"""Engines, sessions and schema migrations for the ledger, on PostgreSQL or SQLite.

The schema belongs to the Alembic migrations in `db/migrations`; `upgrade(url)` (or
`ensure_schema(engine)`) brings a database to the newest revision from code, from any working
directory, and `check_schema(url)` fails when the models and the migrations disagree, like
`alembic check`. The command line works too: `alembic -c db/alembic.ini -x url=URL upgrade head`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    create_engine,
    event,
    inspect,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from db.models import Base, UtcDateTime

if TYPE_CHECKING:
    # Alembic is imported where it is used: importing it costs every command ~0.2-0.3 s, and a
    # command on a database already at HEAD_REVISION never needs it (`ready_schema`).
    from alembic.autogenerate.api import AutogenContext
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# The newest migration in db/migrations/versions (tests/test_db.py holds it to Alembic's head):
# a command reads the database's alembic_version row and compares, without importing Alembic.
HEAD_REVISION = "0008"
# Any constant: serializes concurrent upgrades of one PostgreSQL database.
_MIGRATION_LOCK_KEY = 0x656D6F6C6162


class SchemaMismatchError(RuntimeError):
    """The database is not at the newest migration, or the models and the migrations differ."""


def make_engine(url: str, **kw: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a 30 s busy timeout and foreign keys on each connect.

    Extra keyword arguments go to `sqlalchemy.create_engine`. SQLite keeps the sqlite3 driver's
    default transaction mode (BEGIN before the first write, not before reads): under many writer
    processes a transaction that read first would otherwise fail at once with "database is
    locked" instead of waiting for the busy timeout.
    """
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        connect_args = {"check_same_thread": False, **kw.pop("connect_args", {})}
        engine = create_engine(url, connect_args=connect_args, **kw)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    kw.setdefault("pool_pre_ping", True)
    if make_url(url).get_driver_name() == "psycopg":
        # No server-side prepared statements: after five runs psycopg prepares a statement and
        # PostgreSQL may keep one generic plan for it, made when `results` or `job_items` were
        # nearly empty, in which a batch's `= ANY(:array)` is checked element by element
        # against every row (measured: a scan beside 4 workers fell to 0.07x, each lookup
        # 0.45 -> 4.5 s, bench/RESULTS.md). Planned per execution, the array is a constant that
        # PostgreSQL hashes, and the plan follows the statistics autovacuum keeps.
        kw["connect_args"] = {"prepare_threshold": None, **kw.get("connect_args", {})}
    return create_engine(url, **kw)


def _configure_sqlite_connection(
    dbapi_connection: DBAPIConnection, connection_record: ConnectionPoolEntry
) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Safe with WAL (a power loss may lose the last commits, never corrupt) and much faster.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def refresh_planner_statistics(session: Session) -> None:
    """SQLite: ANALYZE, so that its query planner knows how big the ledger's tables are.

    SQLite never gathers statistics by itself, and without them it guesses that an equality on
    any indexed column is selective: the scan's already-labeled lookup (a batch's URIs joined to
    the model's results) was driven from `results.model_version`, reading every result of the
    model for each batch of 2,048 files. A rescan of 1,000,000 labeled files ran at 3,188
    files/s, and at 15,966 with this call (`python -m bench.producer`, bench/RESULTS.md).
    PostgreSQL: nothing, autovacuum keeps its statistics.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("ANALYZE"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the caller owns `s.begin()`)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def database_url(sessions: sessionmaker[Session]) -> str:
    """The URL (password included) of the engine `sessions` are bound to: for another process
    that opens its own connections to the same database."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        raise ValueError("these sessions are not bound to an engine")
    url: str = engine.url.render_as_string(hide_password=False)
    return url


def alembic_config(url: str | None = None, *, connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code, pointing at this package's migrations."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migration_options() -> dict[str, Any]:
    """Options shared by env.py, `check_schema` and autogenerate, so they compare alike."""
    return {
        "target_metadata": Base.metadata,
        "compare_type": True,
        "render_item": render_item,
        "render_as_batch": True,
    }


def render_item(type_: str, item: Any, autogen_context: AutogenContext) -> str | bool:
    """Render our own column types with plain SQLAlchemy ones, so migrations never import models.

    Also spells out the JSON/JSONB variant, which autogenerate renders with an undefined name.
    """
    if type_ != "type":
        return False
    if isinstance(item, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(item, JSON) and isinstance(item._variant_mapping.get("postgresql"), JSONB):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(), "postgresql")'
    return False


def head_revision() -> str | None:
    """The newest revision in `db/migrations`."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision`, in one transaction, safely concurrent."""
    from alembic import command

    with _migration_connection(engine) as connection:
        command.upgrade(alembic_config(connection=connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database behind `engine` down to `revision` ("base" empties it)."""
    from alembic import command

    with _migration_connection(engine) as connection:
        command.downgrade(alembic_config(connection=connection), revision)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` (the newest by default)."""
    engine = make_engine(url)
    try:
        ensure_schema(engine, revision)
    finally:
        engine.dispose()


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction that other migrating processes wait for, then commit."""
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Rebuilding a table in batch mode must not trip foreign keys, and the pragma is
            # ignored inside a transaction; the sqlite3 driver would run DDL outside any
            # transaction, so BEGIN here, IMMEDIATE so that a second process waits.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            try:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                yield connection
                violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if violations:
                    raise SchemaMismatchError(f"migration broke foreign keys: {violations[:5]}")
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            finally:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        else:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(
                        f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})"
                    )
                yield connection


def schema_differences(connection: Connection) -> list[Any]:
    """What autogenerate would change to make the database match the models (empty: none)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    options = migration_options()
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": options["compare_type"], "render_item": options["render_item"]},
    )
    return list(compare_metadata(context, Base.metadata))


def stored_revision(connection: Connection) -> str | None:
    """The revision in the database's alembic_version row, read with plain SQL (None: none)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    revisions = [
        row[0] for row in connection.exec_driver_sql("SELECT version_num FROM alembic_version")
    ]
    return revisions[0] if len(revisions) == 1 else None


def ready_schema(url: str, *, migrate: bool) -> None:
    """What every command does first: nothing when the database is at HEAD_REVISION (one small
    query, no Alembic); otherwise migrate it (`migrate`, the embedded default) or raise
    SchemaMismatchError. The full models-against-database comparison is `check_schema`
    (`emolabel db check`, and the tests)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = stored_revision(connection)
        if current == HEAD_REVISION:
            return
        if not migrate:
            raise SchemaMismatchError(
                f"database is at revision {current}, migrations end at {HEAD_REVISION}: run upgrade"
            )
        ensure_schema(engine)
    finally:
        engine.dispose()


def check_schema(url: str) -> None:
    """Fail unless the database at `url` is at the newest migration and matches the models."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            head = head_revision()
            if current != head:
                raise SchemaMismatchError(
                    f"database is at revision {current}, migrations end at {head}: run upgrade"
                )
            differences = schema_differences(connection)
    finally:
        engine.dispose()
    if differences:
        listed = "; ".join(str(difference) for difference in differences)
        raise SchemaMismatchError(f"models and migrations differ (write a migration): {listed}")


__all__ = [
    "HEAD_REVISION",
    "MIGRATIONS_DIR",
    "SchemaMismatchError",
    "alembic_config",
    "check_schema",
    "current_revision",
    "database_url",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "migration_options",
    "ready_schema",
    "render_item",
    "schema_differences",
    "stored_revision",
    "upgrade",
]
