"""What the review page reads: a job's labels one row per thing a person judges (an image for a
whole-image model, a face for a face model), the mean self-confidence per class its doubt ranking
needs, and where one thumbnail's pixels come from.

A no_face image has no label to judge and is left out. Filters are applied in SQL; ranking and
paging are the page's (`emolabel.review.ranking`), on the rows returned here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.orm import Session

from db.repository.base import FACES, IMAGES, JOB_ITEMS, JOBS, RESULTS


@dataclass(frozen=True, slots=True)
class ReviewFilters:
    """Which labels a page shows; None: no condition."""

    job_id: int
    label: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    model_version: str | None = None
    uncertain_only: bool = False
    # Only images this other model version labeled differently (what a new model changed).
    changed_from: str | None = None


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """One label to judge: an image's (`face_index` None) or one face's, with all class scores."""

    image_id: int
    uri: str
    model_version: str
    face_index: int | None
    label: str
    confidence: float
    scores: dict[str, float]
    uncertain: bool
    runner_up: str | None
    runner_up_confidence: float | None

    @property
    def key(self) -> tuple[int, str, int | None]:
        return (self.image_id, self.model_version, self.face_index)


@dataclass(frozen=True, slots=True)
class ThumbnailSource:
    """Where a thumbnail is read from: the image's URI, the root of the job that labeled it (reads
    are confined to it as a worker's are), and the face's box (x, y, width, height) if any."""

    uri: str
    fingerprint: str
    job_root: str | None
    box: tuple[int, int, int, int] | None


def _in_job(job_id: int) -> ColumnElement[bool]:
    return RESULTS.c.image_id.in_(
        select(JOB_ITEMS.c.image_id).where(JOB_ITEMS.c.job_id == job_id).scalar_subquery()
    )


def _filtered(query: Select[Any], table: Any, filters: ReviewFilters) -> Select[Any]:
    query = query.where(_in_job(filters.job_id))
    if filters.model_version is not None:
        query = query.where(RESULTS.c.model_version == filters.model_version)
    if filters.label is not None:
        query = query.where(table.c.label == filters.label)
    if filters.min_confidence is not None:
        query = query.where(table.c.confidence >= filters.min_confidence)
    if filters.max_confidence is not None:
        query = query.where(table.c.confidence <= filters.max_confidence)
    if filters.uncertain_only:
        query = query.where(table.c.uncertain.is_(True))
    if filters.changed_from is not None:
        other = RESULTS.alias("other")
        query = query.where(
            exists().where(
                other.c.image_id == RESULTS.c.image_id,
                other.c.model_version == filters.changed_from,
                RESULTS.c.model_version != filters.changed_from,
                other.c.label.is_not(None),
                other.c.label != RESULTS.c.label,
            )
        )
    return query


def review_items(*, session: Session, filters: ReviewFilters) -> list[ReviewItem]:
    """The labels of a job's images that match `filters`, whole-image labels then faces."""
    images = _filtered(
        select(
            RESULTS.c.image_id,
            IMAGES.c.uri,
            RESULTS.c.model_version,
            RESULTS.c.label,
            RESULTS.c.confidence,
            RESULTS.c.scores,
            RESULTS.c.uncertain,
            RESULTS.c.runner_up,
            RESULTS.c.runner_up_confidence,
        )
        .join(IMAGES, IMAGES.c.id == RESULTS.c.image_id)
        .where(RESULTS.c.face_count.is_(None), RESULTS.c.label.is_not(None)),
        RESULTS,
        filters,
    ).order_by(RESULTS.c.image_id, RESULTS.c.model_version)
    faces = _filtered(
        select(
            FACES.c.image_id,
            IMAGES.c.uri,
            FACES.c.model_version,
            FACES.c.face_index,
            FACES.c.label,
            FACES.c.confidence,
            FACES.c.scores,
            FACES.c.uncertain,
            FACES.c.runner_up,
            FACES.c.runner_up_confidence,
        )
        .join(
            RESULTS,
            and_(
                RESULTS.c.image_id == FACES.c.image_id,
                RESULTS.c.model_version == FACES.c.model_version,
            ),
        )
        .join(IMAGES, IMAGES.c.id == FACES.c.image_id),
        FACES,
        filters,
    ).order_by(FACES.c.image_id, FACES.c.model_version, FACES.c.face_index)
    items = [
        ReviewItem(
            image_id=int(row.image_id),
            uri=row.uri,
            model_version=row.model_version,
            face_index=None,
            label=row.label,
            confidence=float(row.confidence),
            scores=dict(row.scores or {}),
            uncertain=bool(row.uncertain),
            runner_up=row.runner_up,
            runner_up_confidence=row.runner_up_confidence,
        )
        for row in session.execute(images)
    ]
    items += [
        ReviewItem(
            image_id=int(row.image_id),
            uri=row.uri,
            model_version=row.model_version,
            face_index=int(row.face_index),
            label=row.label,
            confidence=float(row.confidence),
            scores=dict(row.scores or {}),
            uncertain=bool(row.uncertain),
            runner_up=row.runner_up,
            runner_up_confidence=row.runner_up_confidence,
        )
        for row in session.execute(faces)
    ]
    return items


def mean_confidence_by_label(
    *, session: Session, job_id: int, model_version: str | None = None
) -> dict[tuple[str, str], float]:
    """(model version, label) -> the mean confidence of the job's labels predicted as that class.

    Over the whole job, whatever a page filters: these are the per-class thresholds of the doubt
    ranking, and a filter must not move them.
    """
    thresholds: dict[tuple[str, str], float] = {}
    for table, extra in (
        (RESULTS, RESULTS.c.face_count.is_(None)),
        (FACES, FACES.c.image_id.in_(select(RESULTS.c.image_id).where(_in_job(job_id)))),
    ):
        query = (
            select(table.c.model_version, table.c.label, func.avg(table.c.confidence))
            .where(extra, table.c.label.is_not(None))
            .group_by(table.c.model_version, table.c.label)
        )
        if table is RESULTS:
            query = query.where(_in_job(job_id))
        if model_version is not None:
            query = query.where(table.c.model_version == model_version)
        for version, label, mean in session.execute(query):
            thresholds[(version, label)] = float(mean)
    return thresholds


def job_model_versions(*, session: Session, job_id: int) -> list[str]:
    """The model versions that labeled the images of a job's ledger."""
    query = (
        select(RESULTS.c.model_version)
        .where(_in_job(job_id))
        .distinct()
        .order_by(RESULTS.c.model_version)
    )
    return list(session.scalars(query))


def job_labels(*, session: Session, job_id: int) -> list[str]:
    """The labels given to a job's images or their faces, for the page's label filter."""
    labels = set(
        session.scalars(
            select(RESULTS.c.label).where(_in_job(job_id), RESULTS.c.label.is_not(None)).distinct()
        )
    )
    labels.update(
        session.scalars(
            select(FACES.c.label)
            .where(FACES.c.image_id.in_(select(RESULTS.c.image_id).where(_in_job(job_id))))
            .distinct()
        )
    )
    return sorted(labels)


def thumbnail_source(
    *, session: Session, image_id: int, model_version: str, face_index: int | None = None
) -> ThumbnailSource | None:
    """Where the thumbnail of an image's label (or of one face) is read from; None if that image,
    label or face is not stored."""
    query = (
        select(IMAGES.c.uri, IMAGES.c.fingerprint, JOBS.c.source)
        .select_from(RESULTS)
        .join(IMAGES, IMAGES.c.id == RESULTS.c.image_id)
        .outerjoin(JOBS, JOBS.c.id == RESULTS.c.job_id)
        .where(RESULTS.c.image_id == image_id, RESULTS.c.model_version == model_version)
    )
    found = session.execute(query).one_or_none()
    if found is None:
        return None
    box = None
    if face_index is not None:
        face = session.execute(
            select(FACES.c.x, FACES.c.y, FACES.c.width, FACES.c.height).where(
                FACES.c.image_id == image_id,
                FACES.c.model_version == model_version,
                FACES.c.face_index == face_index,
            )
        ).one_or_none()
        if face is None:
            return None
        box = (int(face.x), int(face.y), int(face.width), int(face.height))
    return ThumbnailSource(
        uri=found.uri, fingerprint=found.fingerprint, job_root=found.source, box=box
    )


def missing_items(
    *, session: Session, keys: Sequence[tuple[int, str, int | None]]
) -> list[tuple[int, str, int | None]]:
    """The keys (image id, model version, face index) among `keys` that name no stored label."""
    return [
        key
        for key in keys
        if thumbnail_source(
            session=session, image_id=key[0], model_version=key[1], face_index=key[2]
        )
        is None
    ]
