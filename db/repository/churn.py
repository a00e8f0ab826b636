"""Label churn between two model versions, read from `results`, and the archive images a
retraining run samples to measure it.

`label_pairs` counts, over the images both versions labeled, each (label by A, label by B) pair:
the stored answer to "what would change", the same numbers a comparison of two exports gives
(`emolabel export --model-version A` and `--model-version B`). A face model's photo without a
face counts with the label None. `recorded_churn` is the churn a retraining run measured on its
archive sample, when one compared the two versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from db.models import RetrainRun
from db.repository.base import IMAGES, JOB_ITEMS, JOBS, RESULTS, id_batches

RETRAIN_RUNS = cast(Table, RetrainRun.__table__)


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    """An image to read again: its URI and the source root of the latest job that listed it
    (the root a worker's read is confined to)."""

    image_id: int
    uri: str
    source: str


@dataclass(frozen=True, slots=True)
class RecordedChurn:
    """The churn a retraining run recorded between its champion and its challenger."""

    run_id: int
    champion_version: str | None
    challenger_version: str | None
    churn: dict[str, Any]


def labeled_image_ids(*, session: Session, model_version: str) -> list[int]:
    """The ids of the images `model_version` has a result for (no_face ones included)."""
    query = (
        select(RESULTS.c.image_id)
        .where(RESULTS.c.model_version == model_version)
        .order_by(RESULTS.c.image_id)
    )
    return [int(value) for value in session.scalars(query)]


def archive_images(*, session: Session, image_ids: Iterable[int]) -> list[ArchiveImage]:
    """The images of `image_ids` with their URI and latest job's source, by id; an image no
    job lists (its jobs deleted) is left out: there is no root to confine its read to."""
    found: list[ArchiveImage] = []
    for batch in id_batches(sorted(set(image_ids))):
        latest = (
            select(JOB_ITEMS.c.image_id, func.max(JOB_ITEMS.c.job_id).label("job_id"))
            .where(JOB_ITEMS.c.image_id.in_(batch))
            .group_by(JOB_ITEMS.c.image_id)
            .subquery()
        )
        query = (
            select(IMAGES.c.id, IMAGES.c.uri, JOBS.c.source)
            .join(latest, latest.c.image_id == IMAGES.c.id)
            .join(JOBS, JOBS.c.id == latest.c.job_id)
            .order_by(IMAGES.c.id)
        )
        found.extend(
            ArchiveImage(int(row.id), row.uri, row.source) for row in session.execute(query)
        )
    return found


def label_pairs(
    *, session: Session, version_a: str, version_b: str, job_id: int | None = None
) -> dict[tuple[str | None, str | None], int]:
    """(label by A, label by B) -> images, over the images both versions labeled; with
    `job_id`, only the images in that job's ledger."""
    before, after = aliased(RESULTS), aliased(RESULTS)
    query = (
        select(before.c.label, after.c.label, func.count())
        .select_from(before)
        .join(
            after,
            and_(after.c.image_id == before.c.image_id, after.c.model_version == version_b),
        )
        .where(before.c.model_version == version_a)
        .group_by(before.c.label, after.c.label)
    )
    if job_id is not None:
        query = query.join(
            JOB_ITEMS,
            and_(JOB_ITEMS.c.image_id == before.c.image_id, JOB_ITEMS.c.job_id == job_id),
        )
    return {(row[0], row[1]): int(row[2]) for row in session.execute(query)}


def changed_image_ids(
    *, session: Session, version_a: str, version_b: str, job_id: int | None = None
) -> list[int]:
    """The images both versions labeled whose labels differ (None counts as a label), by id."""
    before, after = aliased(RESULTS), aliased(RESULTS)
    query = (
        select(before.c.image_id)
        .join(
            after,
            and_(after.c.image_id == before.c.image_id, after.c.model_version == version_b),
        )
        .where(
            before.c.model_version == version_a,
            or_(
                before.c.label != after.c.label,
                and_(before.c.label.is_(None), after.c.label.is_not(None)),
                and_(before.c.label.is_not(None), after.c.label.is_(None)),
            ),
        )
        .order_by(before.c.image_id)
    )
    if job_id is not None:
        query = query.join(
            JOB_ITEMS,
            and_(JOB_ITEMS.c.image_id == before.c.image_id, JOB_ITEMS.c.job_id == job_id),
        )
    return [int(value) for value in session.scalars(query)]


def recorded_churn(*, session: Session, versions: Sequence[str]) -> RecordedChurn | None:
    """The latest retraining run that compared these two versions (either way round) and
    measured churn, or None."""
    first, second = versions
    query = (
        select(RETRAIN_RUNS)
        .where(
            or_(
                and_(
                    RETRAIN_RUNS.c.champion_version == first,
                    RETRAIN_RUNS.c.challenger_version == second,
                ),
                and_(
                    RETRAIN_RUNS.c.champion_version == second,
                    RETRAIN_RUNS.c.challenger_version == first,
                ),
            )
        )
        .order_by(RETRAIN_RUNS.c.id.desc())
    )
    for row in session.execute(query):
        if row.churn:
            return RecordedChurn(
                int(row.id), row.champion_version, row.challenger_version, dict(row.churn)
            )
    return None
