"""The `images` table: every file a scan saw, by URI, with the fingerprint of its version.

`upsert_images` is a hot path, with row locks taken in URI order. On PostgreSQL one
INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT per ten thousand rows (`unnest_rows`); on
SQLite a cached INSERT ... ON CONFLICT executed with a list of rows, in batches under the
bound-parameter limit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    func,
    null,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    NAME_LENGTH,
    utc_now,
)
from db.repository.base import (
    IMAGES,
    array_batches,
    batches,
    check_count,
    check_text,
    column_arrays,
    dialect_insert,
    is_postgresql,
    membership,
    unnest_rows,
)

# The columns a scan gives for each image: `ImageRow`'s fields (the statement adds the times).
_ROW_COLUMNS = (
    "uri",
    "name_bytes",
    "size_bytes",
    "mtime_ns",
    "fingerprint",
    "content_sha256",
    "width",
    "height",
)


@dataclass(frozen=True, slots=True)
class ImageRow:
    """A file as the producer saw it: `uri` is valid UTF-8 (raw name bytes go in `name_bytes`)."""

    uri: str
    fingerprint: str
    size_bytes: int | None = None
    mtime_ns: int | None = None
    name_bytes: bytes | None = None
    content_sha256: str | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        check_text(self.uri, "uri")
        check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)
        for what, value in (
            ("size_bytes", self.size_bytes),
            ("width", self.width),
            ("height", self.height),
        ):
            check_count(value, what)
        if self.content_sha256 is not None and len(self.content_sha256) != 64:
            raise ValueError(f"content_sha256 must be 64 hex digits, got {self.content_sha256!r}")


def upsert_images(*, session: Session, rows: Sequence[ImageRow]) -> dict[str, int]:
    """Insert or refresh images by URI and return uri -> id for every row.

    A row whose fingerprint changed replaces what was known of the old version (checksum and
    size); an unchanged row is not rewritten. A URI given twice keeps its last row.
    """
    latest = {row.uri: row for row in rows}
    # Every process takes row locks in the same order, so two producers cannot deadlock.
    ordered = [latest[uri] for uri in sorted(latest)]
    now = utc_now()
    ids: dict[str, int] = {}
    if is_postgresql(session):
        columns = [IMAGES.c[name] for name in _ROW_COLUMNS]
        given = unnest_rows(columns)
        stamp = bindparam("b_now", type_=IMAGES.c.updated_at.type)
        source = select(*given.c, stamp, stamp).order_by(given.c.uri)
        statement = _image_upsert(
            postgresql.insert(IMAGES).from_select(
                [*_ROW_COLUMNS, "first_seen_at", "updated_at"], source
            )
        ).returning(IMAGES.c.uri, IMAGES.c.id)
        for batch in array_batches(ordered):
            returned = session.execute(statement, {**column_arrays(columns, batch), "b_now": now})
            ids.update({uri: image_id for uri, image_id in returned})
    else:
        statement = _image_upsert(dialect_insert(session, IMAGES)).returning(
            IMAGES.c.uri, IMAGES.c.id
        )
        for batch in batches(session, ordered, parameters_per_item=10):
            returned = session.execute(statement, [_image_values(row, now) for row in batch])
            ids.update({uri: image_id for uri, image_id in returned})
    # Unchanged rows were not touched, so RETURNING left them out.
    ids.update(image_ids_for_uris(session=session, uris=[uri for uri in latest if uri not in ids]))
    return ids


def _image_values(row: ImageRow, now: dt.datetime) -> dict[str, Any]:
    return {
        "uri": row.uri,
        "name_bytes": row.name_bytes,
        "size_bytes": row.size_bytes,
        "mtime_ns": row.mtime_ns,
        "fingerprint": row.fingerprint,
        "content_sha256": row.content_sha256,
        "width": row.width,
        "height": row.height,
        "first_seen_at": now,
        "updated_at": now,
    }


def _image_upsert(
    statement: postgresql.Insert | sqlite.Insert,
) -> postgresql.Insert | sqlite.Insert:
    """`statement` (an INSERT of image rows) made an upsert by URI."""
    new = statement.excluded
    same_version = IMAGES.c.fingerprint == new.fingerprint
    learned = ("content_sha256", "width", "height")
    return statement.on_conflict_do_update(
        index_elements=[IMAGES.c.uri],
        set_={
            "fingerprint": new.fingerprint,
            "size_bytes": new.size_bytes,
            "mtime_ns": new.mtime_ns,
            "name_bytes": new.name_bytes,
            "updated_at": new.updated_at,
            # What we learned about this version stays unless the new row knows it too.
            **{
                column: func.coalesce(
                    new[column], case((same_version, IMAGES.c[column]), else_=null())
                )
                for column in learned
            },
        },
        where=or_(
            ~same_version,
            IMAGES.c.size_bytes.is_distinct_from(new.size_bytes),
            IMAGES.c.mtime_ns.is_distinct_from(new.mtime_ns),
            IMAGES.c.name_bytes.is_distinct_from(new.name_bytes),
            *(
                and_(new[column].is_not(None), IMAGES.c[column].is_distinct_from(new[column]))
                for column in learned
            ),
        ),
    )


def image_ids_for_uris(*, session: Session, uris: Iterable[str]) -> dict[str, int]:
    """uri -> id for the URIs that are known (unknown ones are left out)."""
    wanted = sorted(set(uris))
    ids: dict[str, int] = {}
    for condition in membership(session, IMAGES.c.uri, wanted):
        query = select(IMAGES.c.uri, IMAGES.c.id).where(condition)
        ids.update({uri: image_id for uri, image_id in session.execute(query)})
    return ids
