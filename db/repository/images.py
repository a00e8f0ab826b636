"""The `images` table: every file a scan saw, by URI, with the fingerprint of its version.

`upsert_images` is the scan's hot path, with row locks taken in URI order, written through the
driver (`db.repository.driver`): on PostgreSQL the rows are copied into a staging table and
one INSERT ... SELECT ... ON CONFLICT moves them on; on SQLite the compiled upsert runs with
`executemany` over plain tuples. Every id is then read back in one set-based statement.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    and_,
    bindparam,
    case,
    func,
    null,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    NAME_LENGTH,
    utc_now,
)
from db.repository.base import (
    IMAGES,
    check_count,
    check_text,
    is_postgresql,
    membership,
    parameter_limit,
)
from db.repository.driver import (
    driver_value,
    sqlite_insert_rows,
    sqlite_select_in,
    stage_rows,
    staging_table,
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


# Not frozen, though never changed once made: a scan makes one per file (see `Entry`).
@dataclass(slots=True)
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


@dataclass(frozen=True, slots=True)
class RecordedImages:
    """What `record_images` did: uri -> id of every row, and the ids of the images it inserted
    (new to the ledger: no result, face or ledger row can refer to them yet)."""

    ids: dict[str, int]
    new: frozenset[int]


def upsert_images(*, session: Session, rows: Sequence[ImageRow]) -> dict[str, int]:
    """Insert or refresh images by URI and return uri -> id for every row (`record_images`)."""
    return record_images(session=session, rows=rows).ids


def record_images(*, session: Session, rows: Sequence[ImageRow]) -> RecordedImages:
    """Insert or refresh images by URI; say every row's id and which images are new.

    A row whose fingerprint changed replaces what was known of the old version (checksum and
    size); an unchanged row is not rewritten. A URI given twice keeps its last row. An image is
    new when its `first_seen_at` is this call's own timestamp: the column is written on insert
    only, and the insert is this transaction's, so nothing committed refers to it yet.
    """
    latest = {row.uri: row for row in rows}
    # Every process takes row locks in the same order, so two producers cannot deadlock.
    ordered = [latest[uri] for uri in sorted(latest)]
    if not ordered:
        return RecordedImages({}, frozenset())
    now = utc_now()
    if is_postgresql(session):
        found = _upsert_postgresql(session, ordered, now)
    else:
        found = _upsert_sqlite(session, ordered, now)
    return RecordedImages(
        {uri: image_id for uri, image_id, _ in found},
        frozenset(image_id for _, image_id, new in found if new),
    )


# A row's values in `_ROW_COLUMNS` order, as one tuple built in C (the scan's hot path).
_row_values = operator.attrgetter(*_ROW_COLUMNS)

_STAGED_IMAGES = staging_table("emolabel_staged_images", [IMAGES.c[name] for name in _ROW_COLUMNS])


def _upsert_postgresql(
    session: Session, ordered: Sequence[ImageRow], now: dt.datetime
) -> Sequence[tuple[str, int, bool]]:
    """COPY the rows into a staging table and upsert from it in URI order. The rows it wrote
    (new or changed) come back from RETURNING; the unchanged ones are looked up by URI."""
    stage_rows(
        session,
        _STAGED_IMAGES,
        IMAGES,
        map(_row_values, ordered),
    )
    stamp = bindparam("b_now", type_=IMAGES.c.updated_at.type)
    source = select(*_STAGED_IMAGES.c, stamp, stamp).order_by(_STAGED_IMAGES.c.uri)
    upsert = _image_upsert(
        postgresql.insert(IMAGES).from_select(
            [*_ROW_COLUMNS, "first_seen_at", "updated_at"], source
        )
    ).returning(IMAGES.c.uri, IMAGES.c.id, IMAGES.c.first_seen_at == stamp)
    found = [(uri, image_id, new) for uri, image_id, new in session.execute(upsert, {"b_now": now})]
    if len(found) == len(ordered):
        return found  # a first scan: every row was new
    # The unchanged rows, joined back from the staging table. Autovacuum never analyzes a
    # temporary table: without statistics the planner hashed all of `images` for every batch
    # (EXPLAIN ANALYZE, read by hand); analyzed, it merges with the URI index.
    session.execute(text(f"ANALYZE {_STAGED_IMAGES.name}"))
    written = {uri for uri, _, _ in found}
    known = select(_STAGED_IMAGES.c.uri, IMAGES.c.id).join_from(
        _STAGED_IMAGES, IMAGES, IMAGES.c.uri == _STAGED_IMAGES.c.uri
    )
    return found + [
        (uri, image_id, False) for uri, image_id in session.execute(known) if uri not in written
    ]


def _upsert_sqlite(
    session: Session, ordered: Sequence[ImageRow], now: dt.datetime
) -> Sequence[tuple[str, int, bool]]:
    """The upsert as multi-row statements of plain tuples; the rows it wrote (new or changed)
    come back from RETURNING, the unchanged ones are read by URI."""
    stamp = driver_value(session, IMAGES.c.updated_at.type, now)
    written = sqlite_insert_rows(
        session,
        _SQLITE_UPSERT,
        _SQLITE_KEYS,
        [
            (
                row.uri,
                row.name_bytes,
                row.size_bytes,
                row.mtime_ns,
                row.fingerprint,
                row.content_sha256,
                row.width,
                row.height,
                stamp,
                stamp,
            )
            for row in ordered
        ],
        limit=parameter_limit(session),
    )
    # SQLite returns the stored text of `first_seen_at`: this call's stamp on a new row.
    found = [(uri, image_id, first_seen == stamp) for uri, image_id, first_seen in written]
    if len(found) == len(ordered):
        return found
    returned = {uri for uri, _, _ in found}
    unchanged = sqlite_select_in(
        session,
        "SELECT uri, id FROM images WHERE uri IN ({marks})",
        [row.uri for row in ordered if row.uri not in returned],
        limit=parameter_limit(session),
    )
    return found + [(uri, image_id, False) for uri, image_id in unchanged]


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


_SQLITE_UPSERT = _image_upsert(sqlite.insert(IMAGES)).returning(
    IMAGES.c.uri, IMAGES.c.id, IMAGES.c.first_seen_at
)
_SQLITE_KEYS = (*_ROW_COLUMNS, "first_seen_at", "updated_at")


def image_ids_for_uris(*, session: Session, uris: Iterable[str]) -> dict[str, int]:
    """uri -> id for the URIs that are known (unknown ones are left out)."""
    wanted = sorted(set(uris))
    ids: dict[str, int] = {}
    for condition in membership(session, IMAGES.c.uri, wanted):
        query = select(IMAGES.c.uri, IMAGES.c.id).where(condition)
        ids.update({uri: image_id for uri, image_id in session.execute(query)})
    return ids
