"""Ledger reads and writes the producer needs beyond `db.repository`: `--where` filters and the
end of a scan.

Like the repository, every function takes the session keyword-only and never commits: the scan
owns its transactions. The filters take image ids and return the subset that matches, a few
hundred ids per statement so that SQLite's bound-parameter limit is never reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Subquery, Table, and_, case, func, select, update
from sqlalchemy.orm import Session

from db.models import Image, ItemState, Job, JobItem, JobStatus, Result
from db.repository import NotFoundError

IMAGES = cast(Table, Image.__table__)
JOBS = cast(Table, Job.__table__)
JOB_ITEMS = cast(Table, JobItem.__table__)
RESULTS = cast(Table, Result.__table__)

# Below SQLite's historical limit of 999 bound parameters, with room for the constants.
IDS_PER_STATEMENT = 500

LatestLabelCondition = Callable[[Subquery], ColumnElement[bool]]
"""A condition on the latest label of each image (columns image_id, version, confidence)."""


def latest_label_not_by(*, session: Session, image_ids: Iterable[int], version: str) -> set[int]:
    """The images whose most recent label was written by a model version other than `version`.

    Images never labeled are not in the answer.
    """
    return _latest_label_matching(session, image_ids, lambda latest: latest.c.version != version)


def latest_confidence_below(
    *, session: Session, image_ids: Iterable[int], threshold: float
) -> set[int]:
    """The images whose most recent label has a confidence below `threshold`.

    Images never labeled are not in the answer: there is no confidence to compare.
    """
    return _latest_label_matching(
        session, image_ids, lambda latest: latest.c.confidence < threshold
    )


def latest_outcome_failed(
    *, session: Session, image_ids: Iterable[int], exclude_job_id: int | None = None
) -> set[int]:
    """The images whose latest job item a worker reported on (not skipped by a scan) is failed.

    Skipped rows are passed over, so a scan that left a failed image out (as not selected, say)
    does not hide its failure from the next `--where failed`. Items of `exclude_job_id` (the scan
    asking) are not counted.
    """
    matched: set[int] = set()
    for batch in _batches(image_ids):
        query = _latest_outcomes(batch, exclude_job_id).where(JOB_ITEMS.c.state == ItemState.FAILED)
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
    for batch in _batches(image_ids):
        query = (
            _latest_outcomes(batch, exclude_job_id, JOB_ITEMS.c.reason)
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
    batch: Sequence[int], exclude_job_id: int | None, *columns: ColumnElement[Any]
) -> Select[Any]:
    """The ledger row of each image's latest job that a worker reported on (skips passed over)."""
    conditions = [JOB_ITEMS.c.image_id.in_(batch), JOB_ITEMS.c.state != ItemState.SKIPPED]
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


def end_scan(
    *, session: Session, job_id: int, enqueued: int, error: str | None = None
) -> JobStatus:
    """Record a job's ledger size when its scan ends; a scanning job becomes queued.

    A job that has left `scanning` meanwhile (cancelled by someone, say) keeps its status, which
    is returned either way; `error` records why a scan stopped early.
    """
    if enqueued < 0:
        raise ValueError(f"enqueued must not be negative, got {enqueued}")
    values: dict[str, object] = {
        "enqueued": enqueued,
        "status": case(
            (JOBS.c.status == JobStatus.SCANNING, JobStatus.QUEUED.value), else_=JOBS.c.status
        ),
    }
    if error is not None:
        values["error"] = error
    statement = update(JOBS).where(JOBS.c.id == job_id).values(values).returning(JOBS.c.status)
    status = session.execute(statement).scalar()
    if status is None:
        raise NotFoundError(f"no job with id {job_id}")
    return JobStatus(status)


def _latest_label_matching(
    session: Session,
    image_ids: Iterable[int],
    condition: LatestLabelCondition,
) -> set[int]:
    matched: set[int] = set()
    for batch in _batches(image_ids):
        order = func.row_number().over(
            partition_by=RESULTS.c.image_id,
            order_by=(RESULTS.c.created_at.desc(), RESULTS.c.model_version.desc()),
        )
        latest = (
            select(
                RESULTS.c.image_id,
                RESULTS.c.model_version.label("version"),
                RESULTS.c.confidence,
                order.label("rank"),
            )
            .where(RESULTS.c.image_id.in_(batch))
            .subquery()
        )
        query = select(latest.c.image_id).where(latest.c.rank == 1, condition(latest))
        matched.update(session.scalars(query))
    return matched


def _batches(image_ids: Iterable[int]) -> Iterator[Sequence[int]]:
    ordered = sorted(set(image_ids))
    for start in range(0, len(ordered), IDS_PER_STATEMENT):
        yield ordered[start : start + IDS_PER_STATEMENT]
