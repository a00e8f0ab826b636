"""Exports that PostgreSQL writes itself: CSV through `COPY (SELECT ...) TO STDOUT`, JSON lines
as one `row_to_json` text per row.

Reading an export's rows into Python and writing them again costs a few microseconds per cell:
at ten million rows the Python writers ran at ~30,000 rows/s, where the server formats rows
several times faster and the command only passes its text on. The cells are spelled the way
`emolabel.exports` spells them, so a reader cannot tell which path wrote a file: confidences
with six decimals (CSV), times as ISO 8601 in UTC with `+00:00`, scores as their JSON document.
`tests/test_exports.py` holds both paths to the same rows, hostile names included.

SQLite keeps the Python writers (it has no COPY, and an embedded archive is not ten million
rows); so do Parquet and the per-face export.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from sqlalchemy import ColumnElement, Float, Numeric, Text, cast, func, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.type_api import TypeEngine

from db.models import UtcDateTime
from db.repository.results import ExportQuery

# Python's `datetime.isoformat()` of a UTC time: microseconds only when there are some.
_SECONDS = 'YYYY-MM-DD"T"HH24:MI:SS'


def _iso_utc(column: ColumnElement[Any]) -> ColumnElement[str]:
    utc = func.timezone("UTC", column)
    fraction = func.nullif(func.to_char(utc, ".US"), ".000000")
    return func.to_char(utc, _SECONDS) + func.coalesce(fraction, "") + "+00:00"


def _is(column_type: TypeEngine[Any], kind: type[TypeEngine[Any]]) -> bool:
    return isinstance(column_type, kind) or isinstance(
        getattr(column_type, "impl_instance", None), kind
    )


def _csv_cell(column: ColumnElement[Any]) -> ColumnElement[Any]:
    if _is(column.type, UtcDateTime):
        return _iso_utc(column)
    if _is(column.type, Float):
        # `f"{value:.6f}"` in the Python writer; numeric keeps the scale round() gives it.
        return func.round(cast(column, Numeric), 6)
    if _is(column.type, JSONB):
        return cast(column, Text)
    return column


def _json_cell(column: ColumnElement[Any]) -> ColumnElement[Any]:
    return _iso_utc(column) if _is(column.type, UtcDateTime) else column


def _compiled(session: Session, statement: Any) -> str:
    """The statement as SQL text with its values inline: COPY takes no bound parameters. The
    values are the export's own filters (a job id, states, a model version), rendered by
    SQLAlchemy's literal processors, which quote and escape them."""
    dialect = session.get_bind().dialect
    return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def write_csv(
    session: Session, export: ExportQuery, columns: Sequence[str], write: Callable[[str], Any]
) -> int:
    """Write the header and the export's rows as CSV through `write`; return the rows written."""
    rows = export.select.subquery("rows")
    statement = select(*(_csv_cell(rows.c[name]).label(name) for name in columns)).order_by(
        *(rows.c[name] for name in export.order_by)
    )
    copy_sql = f"COPY ({_compiled(session, statement)}) TO STDOUT WITH (FORMAT csv, HEADER true)"
    connection = session.connection().connection.driver_connection
    decoder = codecs.getincrementaldecoder("utf-8")()
    with connection.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(copy_sql) as copy:
            for block in copy:
                write(decoder.decode(block))
        write(decoder.decode(b"", final=True))
        return int(cursor.rowcount)


def json_lines(
    session: Session, export: ExportQuery, columns: Sequence[str], *, batch_size: int = 10_000
) -> Iterator[str]:
    """The export's rows as JSON objects, one text per row, keys in `columns`' order."""
    rows = export.select.subquery("rows")
    shown = (
        select(*(_json_cell(rows.c[name]).label(name) for name in columns))
        .correlate(rows)
        .lateral("shown")
    )
    statement = (
        select(cast(func.row_to_json(shown.table_valued()), Text))
        .select_from(rows)
        .join(shown, true())
        .order_by(*(rows.c[name] for name in export.order_by))
    )
    result = session.execute(statement.execution_options(yield_per=batch_size))
    yield from result.scalars()


def write_export(
    session: Session,
    export: ExportQuery,
    columns: Sequence[str],
    output_format: str,
    handle: IO[str],
) -> int:
    """Write the export as `csv` or `jsonl` to `handle`; return the rows written."""
    if output_format == "csv":
        return write_csv(session, export, columns, handle.write)
    if output_format != "jsonl":
        raise ValueError(f"the database writes csv or jsonl, not {output_format!r}")
    count = 0
    for line in json_lines(session, export, columns):
        handle.write(line + "\n")
        count += 1
    return count


def renders_exports(session: Session) -> bool:
    """Whether the database writes exports itself (PostgreSQL)."""
    return session.get_bind().dialect.name == "postgresql"


__all__ = ["json_lines", "renders_exports", "write_csv", "write_export"]
