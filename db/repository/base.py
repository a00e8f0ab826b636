"""What the repository's modules share: the tables, `NotFoundError`, row checks, the dialect's
INSERT and cutting a statement's rows into batches under the bound-parameter limit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Enum, String, Table, any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from db.models import Chunk, Face, Image, Job, JobItem, Result

T = TypeVar("T")

IMAGES = cast(Table, Image.__table__)
JOBS = cast(Table, Job.__table__)
CHUNKS = cast(Table, Chunk.__table__)
JOB_ITEMS = cast(Table, JobItem.__table__)
RESULTS = cast(Table, Result.__table__)
FACES = cast(Table, Face.__table__)

# Large statements hold locks longer; a thousand rows is plenty per round trip.
MAX_ROWS_PER_STATEMENT = 1000
# psycopg can bind 65535 parameters; stay well below.
POSTGRESQL_MAX_PARAMETERS = 32_000
# Constants that a statement binds besides the rows (job id, timestamps, states).
_PARAMETER_HEADROOM = 16
# Below SQLite's historical limit of 999 bound parameters, with room for the constants.
IDS_PER_STATEMENT = 500
# PostgreSQL takes a set of values as one array (`membership`): the statement's text is the same
# whatever the count, so ten thousand values go in one round trip.
ARRAY_ROWS_PER_STATEMENT = 10_000


class NotFoundError(LookupError):
    """No job, or no model version, with the identifier given."""


def check_text(value: str, what: str, *, max_length: int | None = None) -> None:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character, which PostgreSQL refuses")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} {value!r} is not valid UTF-8: percent-encode raw bytes (urllib.parse.quote"
            " of os.fsencode(path)) and keep the bytes in name_bytes"
        ) from None
    if max_length is not None and len(value) > max_length:
        raise ValueError(f"{what} {value[:40]!r}... is longer than {max_length} characters")


def check_count(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which has ON CONFLICT."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"database {name!r} is not supported: use PostgreSQL or SQLite")


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _array_type(column_type: TypeEngine[Any]) -> TypeEngine[Any]:
    # A status column is a non-native Enum (VARCHAR with a CHECK): its array is of text.
    return String() if isinstance(column_type, Enum) else column_type


def array_batches(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items`, `ARRAY_ROWS_PER_STATEMENT` at a time: one PostgreSQL statement's arrays."""
    for start in range(0, len(items), ARRAY_ROWS_PER_STATEMENT):
        yield items[start : start + ARRAY_ROWS_PER_STATEMENT]


def membership(
    session: Session, target: ColumnElement[Any], values: Sequence[Any]
) -> Iterator[ColumnElement[bool]]:
    """`target IN values`, as one condition per statement to run: on PostgreSQL
    `target = ANY(:array)` (one statement text for any count), on SQLite `IN (...)` lists under
    its bound-parameter limit. Nothing when `values` is empty."""
    if not is_postgresql(session):
        for batch in batches(session, values, parameters_per_item=1):
            yield target.in_(batch)
        return
    for batch in array_batches(values):
        array = bindparam(
            "m_values",
            value=list(batch),
            type_=postgresql.ARRAY(_array_type(target.type)),
            unique=True,
        )
        yield target == any_(array)


def parameter_limit(session: Session) -> int:
    """How many bound parameters one statement may carry on this connection."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return POSTGRESQL_MAX_PARAMETERS
    getlimit = getattr(connection.connection.dbapi_connection, "getlimit", None)
    if getlimit is None:
        return 999  # SQLite's historical default, true for every build before 3.32
    return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def batches(
    session: Session, items: Sequence[T], parameters_per_item: int
) -> Iterator[Sequence[T]]:
    """`items` cut into statements that stay under the connection's bound-parameter limit."""
    usable = max(1, parameter_limit(session) - _PARAMETER_HEADROOM)
    size = max(1, min(MAX_ROWS_PER_STATEMENT, usable // parameters_per_item))
    for start in range(0, len(items), size):
        yield items[start : start + size]


def json_document(value: Any, what: str) -> Any:
    """`value` as plain JSON (lists, not tuples); NaN and infinity refused, as PostgreSQL does."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} is not a JSON document: {error}") from None


def id_batches(image_ids: Iterable[int]) -> Iterator[Sequence[int]]:
    """Distinct ids in order, `IDS_PER_STATEMENT` at a time (for `IN (...)` filters)."""
    ordered = sorted(set(image_ids))
    for start in range(0, len(ordered), IDS_PER_STATEMENT):
        yield ordered[start : start + IDS_PER_STATEMENT]
