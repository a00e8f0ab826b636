"""A chunk's outcome, written in bulk: results upserted on (image, model version), ledger rows
labeled or failed, the chunk done.

A redelivered chunk writes no result twice: a result is rewritten only when the image's
fingerprint changed since it was labeled, and a labeled ledger row never turns failed.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    bindparam,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from db.models import (
    NAME_LENGTH,
    REASON_LENGTH,
    ChunkStatus,
    ItemState,
    utc_now,
)
from db.repository.base import (
    CHUNKS,
    IMAGES,
    JOB_ITEMS,
    RESULTS,
    NotFoundError,
    batches,
    check_text,
    dialect_insert,
)


@dataclass(frozen=True, slots=True)
class ResultRow:
    """A label for one image by one model version, with every class score.

    `fingerprint` is the version of the image that was read; None takes the one in `images`.
    """

    image_id: int
    model_version: str
    label: str
    confidence: float
    scores: Mapping[str, float]
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        check_text(self.label, "label", max_length=NAME_LENGTH)
        if not math.isfinite(self.confidence):
            raise ValueError(f"confidence of image {self.image_id} is {self.confidence}")
        if not all(math.isfinite(score) for score in self.scores.values()):
            raise ValueError(f"scores of image {self.image_id} are not all finite: {self.scores}")
        if self.fingerprint is not None:
            check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)


@dataclass(frozen=True, slots=True)
class FailureRow:
    """An image a worker could not label: a stable `reason` code and a message for people."""

    image_id: int
    reason: str
    message: str | None = None

    def __post_init__(self) -> None:
        check_text(self.reason, "reason", max_length=REASON_LENGTH)


def record_outcomes(
    *,
    session: Session,
    job_id: int,
    results: Sequence[ResultRow],
    failures: Sequence[FailureRow],
    chunk_index: int | None = None,
) -> int:
    """Write a chunk's labels and failures in bulk; return how many result rows were written.

    Results are upserted on (image_id, model_version) and rewritten only when the image's
    fingerprint changed, so a redelivered chunk writes no result twice. Ledger rows become
    labeled or failed (a labeled row never turns failed) and count one more attempt. With
    `chunk_index`, the chunk is marked done.
    """
    labeled_ids = {row.image_id for row in results}
    both = labeled_ids & {row.image_id for row in failures}
    if both:
        raise ValueError(f"images {sorted(both)[:10]} are both labeled and failed")
    now = utc_now()
    written = _upsert_results(session=session, job_id=job_id, results=results, now=now)
    _mark_labeled(session=session, job_id=job_id, image_ids=sorted(labeled_ids), now=now)
    _mark_failed(session=session, job_id=job_id, failures=failures, now=now)
    if chunk_index is not None:
        session.execute(
            update(CHUNKS)
            .where(CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index)
            .values(status=ChunkStatus.DONE)
        )
    return written


def _upsert_results(
    *, session: Session, job_id: int, results: Sequence[ResultRow], now: dt.datetime
) -> int:
    latest = {(row.image_id, row.model_version): row for row in results}
    ordered = [latest[key] for key in sorted(latest)]
    # One statement executed with a list of rows: it compiles once and is cached. A multi-row
    # `.values([...])` (with a fingerprint subquery per row) recompiled on every chunk and was
    # most of a worker's write time (bench/RESULTS.md).
    insert = dialect_insert(session, RESULTS)
    new = insert.excluded
    statement = insert.on_conflict_do_update(
        index_elements=["image_id", "model_version"],
        set_={
            column: new[column]
            for column in ("label", "confidence", "scores", "fingerprint", "job_id", "created_at")
        },
        where=RESULTS.c.fingerprint != new.fingerprint,
    ).returning(RESULTS.c.image_id)
    written = 0
    for batch in batches(session, ordered, parameters_per_item=9):
        fingerprints = _fingerprints(
            session, [row.image_id for row in batch if row.fingerprint is None]
        )
        parameters = [
            {
                "image_id": row.image_id,
                "model_version": row.model_version,
                "label": row.label,
                "confidence": float(row.confidence),
                "scores": {str(name): float(score) for name, score in row.scores.items()},
                "fingerprint": (
                    row.fingerprint if row.fingerprint is not None else fingerprints[row.image_id]
                ),
                "job_id": job_id,
                "created_at": now,
            }
            for row in batch
        ]
        written += len(session.execute(statement, parameters).all())
    return written


def _fingerprints(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    query = select(IMAGES.c.id, IMAGES.c.fingerprint).where(IMAGES.c.id.in_(image_ids))
    found = {image_id: fingerprint for image_id, fingerprint in session.execute(query)}
    missing = [image_id for image_id in image_ids if image_id not in found]
    if missing:
        raise NotFoundError(f"no images with ids {missing[:10]}")
    return found


def _mark_labeled(
    *, session: Session, job_id: int, image_ids: Sequence[int], now: dt.datetime
) -> None:
    for batch in batches(session, image_ids, parameters_per_item=1):
        session.execute(
            update(JOB_ITEMS)
            .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.image_id.in_(batch))
            .values(
                state=ItemState.LABELED,
                reason=None,
                message=None,
                attempts=JOB_ITEMS.c.attempts + 1,
                updated_at=now,
            )
        )


def _mark_failed(
    *, session: Session, job_id: int, failures: Sequence[FailureRow], now: dt.datetime
) -> None:
    if not failures:
        return
    statement = (
        update(JOB_ITEMS)
        .where(
            JOB_ITEMS.c.job_id == job_id,
            JOB_ITEMS.c.image_id == bindparam("failed_image_id"),
            # A redelivery must not undo a label, nor touch what the producer skipped.
            or_(JOB_ITEMS.c.state == ItemState.PENDING, JOB_ITEMS.c.state == ItemState.FAILED),
        )
        .values(
            state=ItemState.FAILED,
            reason=bindparam("failed_reason"),
            message=bindparam("failed_message"),
            attempts=JOB_ITEMS.c.attempts + 1,
            updated_at=now,
        )
    )
    latest = {row.image_id: row for row in failures}
    session.execute(
        statement,
        [
            {
                "failed_image_id": row.image_id,
                "failed_reason": row.reason,
                "failed_message": row.message,
            }
            for row in (latest[image_id] for image_id in sorted(latest))
        ],
    )
