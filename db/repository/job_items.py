"""The `job_items` table, the ledger proper: one row per image per job, pending in a chunk or
labeled, failed or skipped with a reason.

The `--where` and already-failed filters take image ids and return the subset that matches, in
statements that stay under SQLite's bound-parameter limit (`membership`: PostgreSQL takes the
ids as one array). `add_job_items`, on the scan's hot path, writes through the driver
(`db.repository.driver`: COPY and one set-based insert on PostgreSQL, executemany on SQLite).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    REASON_LENGTH,
    ItemState,
    JobStatus,
    utc_now,
)
from db.repository.base import (
    IMAGES,
    JOB_ITEMS,
    JOBS,
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


# Not frozen, though never changed once made: a scan makes one per file (see `Entry`).
@dataclass(slots=True)
class JobItemRow:
    """An image entering a job's ledger: pending in a chunk, or skipped/failed while scanning."""

    image_id: int
    chunk_index: int | None = None
    state: ItemState = ItemState.PENDING
    reason: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.state is ItemState.PENDING and self.reason is None:
            return  # most rows of a scan: nothing to check
        if self.state in (ItemState.LABELED, ItemState.UNCERTAIN, ItemState.NO_FACE):
            raise ValueError(
                f"an item enters the ledger pending, skipped or failed, not {self.state}"
            )
        if self.state is not ItemState.PENDING and self.reason is None:
            raise ValueError(f"a {self.state} item needs a reason code")
        if self.reason is not None:
            check_text(self.reason, "reason", max_length=REASON_LENGTH)


@dataclass(frozen=True, slots=True)
class FailedItem:
    """A failed ledger row with its image's URI."""

    job_id: int
    image_id: int
    uri: str
    reason: str | None
    message: str | None
    attempts: int
    updated_at: dt.datetime


def add_job_items(
    *,
    session: Session,
    job_id: int,
    items: Sequence[JobItemRow],
    new_images: Collection[int] = frozenset(),
) -> set[int]:
    """Put images into a job's ledger, once each (the first row given for an image wins);
    return the ids of the images whose row is new. `new_images` are images this transaction
    inserted (`record_images`), which no ledger row can name yet.

    On SQLite call it in a transaction that has already written (the scan allocates its chunk
    numbers first): the rows already there are read before the insert, and only a writer
    holding SQLite's one write lock can be sure that nobody adds one in between.
    """
    rows = sorted({item.image_id: item for item in reversed(items)}.values(), key=_by_image)
    if not rows:
        return set()
    now = utc_now()
    if is_postgresql(session):
        # COPY into a staging table, then one INSERT ... SELECT in image order (row locks in
        # one order across processes), which returns the rows that went in.
        stage_rows(
            session,
            _STAGED_ITEMS,
            JOB_ITEMS,
            (
                (item.image_id, item.chunk_index, item.state.value, item.reason, item.message)
                for item in rows
            ),
        )
        source = select(
            bindparam("b_job_id", type_=JOB_ITEMS.c.job_id.type),
            *_STAGED_ITEMS.c,
            literal(0, JOB_ITEMS.c.attempts.type),
            bindparam("b_now", type_=JOB_ITEMS.c.updated_at.type),
        ).order_by(_STAGED_ITEMS.c.image_id)
        statement = (
            postgresql.insert(JOB_ITEMS)
            .from_select(["job_id", *_ITEM_COLUMNS, "attempts", "updated_at"], source)
            .on_conflict_do_nothing(index_elements=["job_id", "image_id"])
            .returning(JOB_ITEMS.c.image_id)
        )
        return set(session.scalars(statement, {"b_job_id": job_id, "b_now": now}))
    wanted = [item.image_id for item in rows]
    present = sqlite_select_in(
        session,
        "SELECT image_id FROM job_items WHERE job_id = ? AND image_id IN ({marks})",
        [image_id for image_id in wanted if image_id not in new_images],
        before=(job_id,),
        limit=parameter_limit(session),
    )
    stamp = driver_value(session, JOB_ITEMS.c.updated_at.type, now)
    sqlite_insert_rows(
        session,
        _SQLITE_ADD,
        _SQLITE_KEYS,
        [
            (
                job_id,
                item.image_id,
                item.chunk_index,
                item.state.value,
                item.reason,
                item.message,
                0,
                stamp,
            )
            for item in rows
        ],
        limit=parameter_limit(session),
    )
    return set(wanted) - {image_id for (image_id,) in present}


def _by_image(item: JobItemRow) -> int:
    return item.image_id


_ITEM_COLUMNS = ("image_id", "chunk_index", "state", "reason", "message")
_STAGED_ITEMS = staging_table(
    "emolabel_staged_job_items", [JOB_ITEMS.c[name] for name in _ITEM_COLUMNS]
)
_SQLITE_ADD = sqlite.insert(JOB_ITEMS).on_conflict_do_nothing(index_elements=["job_id", "image_id"])
_SQLITE_KEYS = ("job_id", *_ITEM_COLUMNS, "attempts", "updated_at")


def failed_items(
    *, session: Session, job_id: int | None = None, batch_size: int = 1000
) -> Iterator[FailedItem]:
    """Stream the failed ledger rows (of one job, or of all), oldest job first."""
    query = (
        select(
            JOB_ITEMS.c.job_id,
            JOB_ITEMS.c.image_id,
            IMAGES.c.uri,
            JOB_ITEMS.c.reason,
            JOB_ITEMS.c.message,
            JOB_ITEMS.c.attempts,
            JOB_ITEMS.c.updated_at,
        )
        .join(IMAGES, IMAGES.c.id == JOB_ITEMS.c.image_id)
        .where(JOB_ITEMS.c.state == ItemState.FAILED)
        .order_by(JOB_ITEMS.c.job_id, JOB_ITEMS.c.image_id)
    )
    if job_id is not None:
        query = query.where(JOB_ITEMS.c.job_id == job_id)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        yield FailedItem(*row)


def latest_outcome_failed(
    *, session: Session, image_ids: Iterable[int], exclude_job_id: int | None = None
) -> set[int]:
    """The images whose latest job item a worker reported on (not skipped by a scan) is failed.

    Skipped rows are passed over, so a scan that left a failed image out (as not selected, say)
    does not hide its failure from the next `--where failed`. Items of `exclude_job_id` (the scan
    asking) are not counted.
    """
    matched: set[int] = set()
    for among in membership(session, JOB_ITEMS.c.image_id, sorted(set(image_ids))):
        query = _latest_outcomes(among, exclude_job_id).where(JOB_ITEMS.c.state == ItemState.FAILED)
        matched.update(session.scalars(query))
    return matched


def failed_and_unchanged(
    *,
    session: Session,
    image_ids: Iterable[int],
    reasons: Iterable[str],
    exclude_job_id: int | None = None,
) -> dict[int, str]:
    """image id -> reason, for the images whose latest worker outcome is a failure for one of
    `reasons` recorded after the image last changed: the same file would fail the same way.

    Call it after `upsert_images` in the scan's transaction, which moves an image's `updated_at`
    when its fingerprint changed.
    """
    wanted = sorted(set(reasons))
    matched: dict[int, str] = {}
    for among in membership(session, JOB_ITEMS.c.image_id, sorted(set(image_ids))):
        query = (
            _latest_outcomes(among, exclude_job_id, JOB_ITEMS.c.reason)
            .join(IMAGES, IMAGES.c.id == JOB_ITEMS.c.image_id)
            .where(
                JOB_ITEMS.c.state == ItemState.FAILED,
                JOB_ITEMS.c.reason.in_(wanted),
                JOB_ITEMS.c.updated_at >= IMAGES.c.updated_at,
            )
        )
        matched.update({image_id: reason for image_id, reason in session.execute(query)})
    return matched


def _latest_outcomes(
    among: ColumnElement[bool], exclude_job_id: int | None, *columns: ColumnElement[Any]
) -> Select[Any]:
    """The ledger row of each image (those `among` selects) in its latest job that a worker
    reported on (skips passed over)."""
    conditions = [among, JOB_ITEMS.c.state != ItemState.SKIPPED]
    if exclude_job_id is not None:
        conditions.append(JOB_ITEMS.c.job_id != exclude_job_id)
    latest = (
        select(JOB_ITEMS.c.image_id, func.max(JOB_ITEMS.c.job_id).label("job_id"))
        .where(*conditions)
        .group_by(JOB_ITEMS.c.image_id)
        .subquery()
    )
    return select(JOB_ITEMS.c.image_id, *columns).join(
        latest,
        and_(JOB_ITEMS.c.image_id == latest.c.image_id, JOB_ITEMS.c.job_id == latest.c.job_id),
    )


@dataclass(frozen=True, slots=True)
class FailedImage:
    """A failed image of a job, to enqueue again."""

    image_id: int
    uri: str


def failed_images(*, session: Session, job_id: int) -> list[FailedImage]:
    """The job's failed images with their URIs, by image id."""
    query = (
        select(JOB_ITEMS.c.image_id, IMAGES.c.uri)
        .join(IMAGES, IMAGES.c.id == JOB_ITEMS.c.image_id)
        .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.state == ItemState.FAILED)
        .order_by(JOB_ITEMS.c.image_id)
    )
    return [FailedImage(image_id, uri) for image_id, uri in session.execute(query)]


def return_to_pending(
    *, session: Session, job_id: int, image_ids: Sequence[int], chunk_index: int
) -> None:
    """Put images of a job back to pending, in chunk `chunk_index`, their reason cleared."""
    session.execute(
        update(JOB_ITEMS)
        .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.image_id.in_(list(image_ids)))
        .values(state=ItemState.PENDING, reason=None, message=None, chunk_index=chunk_index)
    )


def outcome_reasons(*, session: Session, job_id: int) -> list[tuple[str, str | None, int]]:
    """(state, reason, count) of a job's failed and skipped images, most frequent first (for a
    finished or pruned job, as its summary kept them)."""
    summary = session.scalar(
        select(JOBS.c.summary).where(
            JOBS.c.id == job_id,
            or_(JOBS.c.pruned_at.is_not(None), JOBS.c.status == JobStatus.DONE),
        )
    )
    if summary is not None and "reasons" in summary:
        return [(str(state), reason, int(n)) for state, reason, n in summary.get("reasons", [])]
    query = (
        select(JOB_ITEMS.c.state, JOB_ITEMS.c.reason, func.count())
        .where(
            JOB_ITEMS.c.job_id == job_id,
            JOB_ITEMS.c.state.in_([ItemState.FAILED, ItemState.SKIPPED]),
        )
        .group_by(JOB_ITEMS.c.state, JOB_ITEMS.c.reason)
    )
    counts: Counter[tuple[str, str | None]] = Counter()
    for state, reason, number in session.execute(query):
        counts[str(state), reason] += int(number)
    # The files counted from settled runs, without a row each (`db.repository.listings`).
    unread = session.scalar(select(JOBS.c.unread).where(JOBS.c.id == job_id)) or {}
    for reason, number in unread.items():
        counts[str(ItemState.SKIPPED), str(reason)] += int(number)
    return [(state, reason, number) for (state, reason), number in counts.most_common()]


def count_job_items(*, session: Session, job_id: int) -> int:
    """How many ledger rows the job has (whatever their state)."""
    query = select(func.count()).select_from(JOB_ITEMS).where(JOB_ITEMS.c.job_id == job_id)
    return int(session.scalar(query) or 0)
