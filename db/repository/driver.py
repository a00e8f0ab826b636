"""The scan's hot writes handed to the database driver: rows as plain tuples, no SQLAlchemy
parameter processing per row.

A first scan writes an `images` row and a `job_items` row per file. Through SQLAlchemy Core each
row's every value went through its compiled parameter machinery (`construct_params`, a type
processor per value); psycopg then dumped each array element in Python. That was most of the
producer's "database and the rest" (profiled by hand, bench/RESULTS.md). Here:

- SQLite: the statement SQLAlchemy compiles (once, cached by `positional`) runs with
  `executemany` and a list of tuples, which the sqlite3 module binds in C; values that need a
  type processor (a timestamp) are processed once per call, not once per row.
- PostgreSQL: the rows are copied (psycopg COPY, formatted in C) into a temporary staging table,
  and one set-based statement moves them on (`stage_rows`).

The statements themselves stay SQLAlchemy constructs, so the SQL is written once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Column, Table, TableClause, column, table
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeEngine


def driver_value(session: Session, column_type: TypeEngine[Any], value: Any) -> Any:
    """`value` as the driver receives it for a column of `column_type` (a timestamp as SQLite's
    text, for instance): computed once and bound as it is to every row."""
    dialect = session.get_bind().dialect
    processor = column_type.dialect_impl(dialect).bind_processor(dialect)
    return value if processor is None else processor(value)


@functools.cache
def _positional(statement: Insert, dialect: Dialect, keys: tuple[str, ...]) -> str:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    if list(compiled.positiontup or ()) != list(keys):
        raise AssertionError(f"compiled parameters {compiled.positiontup} are not {keys}")
    return compiled.string


def sqlite_insert_rows(
    session: Session,
    statement: Insert,
    keys: Sequence[str],
    rows: Sequence[tuple[Any, ...]],
    *,
    limit: int,
) -> list[tuple[Any, ...]]:
    """Insert `rows` (tuples in the order of `keys`) with the single-row INSERT `statement` made
    multi-row: as many rows per statement as `limit` parameters allow. Returns what its
    RETURNING clause returned (nothing without one).

    One statement of many rows is one step of SQLite's engine, during which the sqlite3 module
    lets other threads run; `executemany` steps (and gives up and takes back the GIL) once per
    row, which, with a thread reading files beside it, made the writes wait on that thread
    far longer than they took (sampled by hand with py-spy).
    """
    returned: list[tuple[Any, ...]] = []
    if not rows:
        return returned
    connection = session.connection()
    single = _positional(statement, connection.dialect, tuple(keys))
    marks = "(" + ", ".join("?" * len(keys)) + ")"
    head, tail = single.split(marks, 1)
    per_statement = max(1, limit // len(keys))
    for start in range(0, len(rows), per_statement):
        part = rows[start : start + per_statement]
        sql = head + ", ".join([marks] * len(part)) + tail
        result = connection.exec_driver_sql(sql, tuple(value for row in part for value in row))
        if result.returns_rows:
            returned.extend(tuple(row) for row in result.fetchall())
    return returned


def sqlite_select_in(
    session: Session,
    select_sql: str,
    values: Sequence[Any],
    *,
    before: tuple[Any, ...] = (),
    limit: int,
) -> list[tuple[Any, ...]]:
    """The rows of `select_sql`, whose one `IN ({marks})` takes `values`, in statements of at
    most `limit` parameters (after the `before` ones bound ahead of them)."""
    connection = session.connection()
    rows: list[tuple[Any, ...]] = []
    size = max(1, limit - len(before))
    for start in range(0, len(values), size):
        part = values[start : start + size]
        sql = select_sql.format(marks=", ".join("?" * len(part)))
        rows.extend(connection.exec_driver_sql(sql, (*before, *part)).fetchall())
    return rows


def staging_table(name: str, columns: Iterable[Column[Any]]) -> TableClause:
    """A lightweight table named `name` with the names and types of `columns`, for statements
    that read a staging table (`stage_rows`)."""
    return table(name, *(column(c.name, c.type) for c in columns))


def stage_rows(
    session: Session, staged: TableClause, target: Table, rows: Iterable[Sequence[Any]]
) -> None:
    """Copy `rows` (tuples in `staged`'s column order) into the PostgreSQL temporary table
    `staged`, created on first use in the connection with the types of `target`'s columns of
    the same names and emptied at every commit; it is emptied here first too, so a second use
    in one transaction starts clean."""
    raw = session.connection().connection.driver_connection
    names = [c.name for c in staged.columns]
    definition = ", ".join(
        f"{name} {target.c[name].type.compile(dialect=session.get_bind().dialect)}"
        for name in names
    )
    listed = ", ".join(names)
    with raw.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staged.name} ({definition})"
            " ON COMMIT DELETE ROWS"
        )
        cursor.execute(f"DELETE FROM {staged.name}")
        with cursor.copy(f"COPY {staged.name} ({listed}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
