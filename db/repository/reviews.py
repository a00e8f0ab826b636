"""The `reviews` table: a person's verdicts on labels, and the human labels they add up to.

A verdict names what was looked at: an image's label by one model version (`face_index` None) or
one face of it. It is checked against what is stored before anything is written: the result (or
face) must exist, the new label must be one of the model version's classes. A batch of verdicts
is written whole or not at all (`ReviewError` names the first bad one). The human label of an
(image, face) is its latest verdict, whichever model version it was given on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Subquery, Table, and_, func, insert, select, tuple_
from sqlalchemy.orm import Session

from db.models import NAME_LENGTH, ModelVersion, Review, utc_now
from db.repository.base import FACES, IMAGES, RESULTS, check_text

REVIEWS = cast(Table, Review.__table__)
MODEL_VERSIONS = cast(Table, ModelVersion.__table__)


class ReviewError(ValueError):
    """A verdict that does not fit what is stored: unknown image or face, or a label the model
    version does not have. Nothing of its batch was written."""


@dataclass(frozen=True, slots=True)
class ReviewInput:
    """One verdict: `new_label` for the label `model_version` gave the image (or its face)."""

    image_id: int
    model_version: str
    new_label: str
    reviewer: str
    face_index: int | None = None
    job_id: int | None = None

    def __post_init__(self) -> None:
        check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        check_text(self.new_label, "label", max_length=NAME_LENGTH)
        check_text(self.reviewer, "reviewer", max_length=NAME_LENGTH)
        if self.face_index is not None and self.face_index < 0:
            raise ValueError(f"face_index must not be negative, got {self.face_index}")


@dataclass(frozen=True, slots=True)
class HumanLabel:
    """The latest verdict on an image (or one of its faces) and what it was given on.

    `box` is the face's (x, y, width, height) in the model version's faces; None for an image.
    `fingerprint` is the image version the person saw; `current_fingerprint` the one known now.
    """

    review_id: int
    image_id: int
    uri: str
    face_index: int | None
    box: tuple[int, int, int, int] | None
    model_version: str
    old_label: str | None
    label: str
    reviewer: str
    reviewed_at: dt.datetime
    fingerprint: str | None
    current_fingerprint: str

    @property
    def corrected(self) -> bool:
        return self.old_label != self.label

    @property
    def stale(self) -> bool:
        """The file changed since the person looked at it: the verdict is about another image."""
        return self.fingerprint is not None and self.fingerprint != self.current_fingerprint


def model_classes(*, session: Session, versions: Iterable[str]) -> dict[str, list[str]]:
    """Each model version's classes: the registry's, else the class scores its results carry."""
    wanted = sorted(set(versions))
    found: dict[str, list[str]] = {}
    for version, names in session.execute(
        select(MODEL_VERSIONS.c.version, MODEL_VERSIONS.c.class_names).where(
            MODEL_VERSIONS.c.version.in_(wanted)
        )
    ):
        found[version] = list(names)
    for version in set(wanted) - set(found):
        # A worker may label with a model that was never registered here: its scores name its
        # classes (a no_face result has none, so take one that has).
        scores = session.execute(
            select(RESULTS.c.scores)
            .where(RESULTS.c.model_version == version, RESULTS.c.label.is_not(None))
            .limit(1)
        ).scalar_one_or_none()
        if scores:
            found[version] = list(scores)
    return found


def record_reviews(*, session: Session, reviews: Sequence[ReviewInput]) -> list[int]:
    """Check every verdict against the stored labels, then write them all; return their ids.

    Raises `ReviewError` (nothing written) for an image without a result by that model version,
    a face index the result does not have, or a label outside the model version's classes.
    """
    if not reviews:
        return []
    classes = model_classes(session=session, versions=(review.model_version for review in reviews))
    keys = {(review.image_id, review.model_version) for review in reviews}
    stored = {
        (row.image_id, row.model_version): row
        for row in session.execute(
            select(
                RESULTS.c.image_id,
                RESULTS.c.model_version,
                RESULTS.c.label,
                RESULTS.c.job_id,
                RESULTS.c.fingerprint,
            ).where(tuple_(RESULTS.c.image_id, RESULTS.c.model_version).in_(sorted(keys)))
        )
    }
    face_keys = {
        (review.image_id, review.model_version, review.face_index)
        for review in reviews
        if review.face_index is not None
    }
    faces = {}
    if face_keys:
        faces = {
            (row.image_id, row.model_version, row.face_index): row.label
            for row in session.execute(
                select(
                    FACES.c.image_id, FACES.c.model_version, FACES.c.face_index, FACES.c.label
                ).where(
                    tuple_(FACES.c.image_id, FACES.c.model_version, FACES.c.face_index).in_(
                        sorted(face_keys)
                    )
                )
            )
        }
    rows = []
    now = utc_now()
    for review in reviews:
        result = stored.get((review.image_id, review.model_version))
        if result is None:
            raise ReviewError(
                f"image {review.image_id} has no label by model {review.model_version}"
            )
        names = classes.get(review.model_version, [])
        if review.new_label not in names:
            raise ReviewError(
                f"label {review.new_label!r} is not a class of model {review.model_version} "
                f"({', '.join(names) or 'no classes known'})"
            )
        if review.face_index is None:
            old_label = result.label
        else:
            face_label = faces.get((review.image_id, review.model_version, review.face_index))
            if face_label is None:
                raise ReviewError(
                    f"image {review.image_id} has no face {review.face_index} by model "
                    f"{review.model_version}"
                )
            old_label = face_label
        if old_label is None:
            raise ReviewError(
                f"image {review.image_id} has no label to review by model "
                f"{review.model_version} (no face was found)"
            )
        rows.append(
            {
                "image_id": review.image_id,
                "face_index": review.face_index,
                "model_version": review.model_version,
                "old_label": old_label,
                "new_label": review.new_label,
                "reviewer": review.reviewer,
                "job_id": review.job_id if review.job_id is not None else result.job_id,
                "fingerprint": result.fingerprint,
                "created_at": now,
            }
        )
    inserted = session.execute(insert(REVIEWS).returning(REVIEWS.c.id), rows)
    return [int(value) for value in inserted.scalars()]


def human_labels(*, session: Session, image_ids: Sequence[int] | None = None) -> list[HumanLabel]:
    """The latest verdict per (image, face index), oldest image first.

    With `image_ids`, only those images'. A face verdict carries the face's box as the model
    version it was given on stored it.
    """
    latest = select(
        REVIEWS.c.image_id,
        REVIEWS.c.face_index,
        func.max(REVIEWS.c.id).label("review_id"),
    ).group_by(REVIEWS.c.image_id, REVIEWS.c.face_index)
    if image_ids is not None:
        latest = latest.where(REVIEWS.c.image_id.in_(sorted(set(image_ids))))
    newest = latest.subquery()
    query = (
        select(
            REVIEWS,
            IMAGES.c.uri,
            IMAGES.c.fingerprint.label("current_fingerprint"),
            FACES.c.x,
            FACES.c.y,
            FACES.c.width,
            FACES.c.height,
        )
        .join(newest, REVIEWS.c.id == newest.c.review_id)
        .join(IMAGES, IMAGES.c.id == REVIEWS.c.image_id)
        .outerjoin(
            FACES,
            and_(
                FACES.c.image_id == REVIEWS.c.image_id,
                FACES.c.model_version == REVIEWS.c.model_version,
                FACES.c.face_index == REVIEWS.c.face_index,
            ),
        )
        .order_by(REVIEWS.c.image_id, REVIEWS.c.face_index)
    )
    labels = []
    for row in session.execute(query):
        box = None
        if row.face_index is not None and row.width is not None:
            box = (int(row.x), int(row.y), int(row.width), int(row.height))
        labels.append(
            HumanLabel(
                review_id=int(row.id),
                image_id=int(row.image_id),
                uri=row.uri,
                face_index=row.face_index,
                box=box,
                model_version=row.model_version,
                old_label=row.old_label,
                label=row.new_label,
                reviewer=row.reviewer,
                reviewed_at=row.created_at,
                fingerprint=row.fingerprint,
                current_fingerprint=row.current_fingerprint,
            )
        )
    return labels


def latest_verdicts() -> Subquery:
    """A subquery of the latest verdict per (image, face index): image_id, face_index,
    new_label, reviewer, created_at; for exports to join their rows with."""
    newest = (
        select(func.max(REVIEWS.c.id).label("review_id"))
        .group_by(REVIEWS.c.image_id, REVIEWS.c.face_index)
        .subquery()
    )
    return (
        select(
            REVIEWS.c.image_id,
            REVIEWS.c.face_index,
            REVIEWS.c.new_label,
            REVIEWS.c.reviewer,
            REVIEWS.c.created_at,
        )
        .join(newest, newest.c.review_id == REVIEWS.c.id)
        .subquery("latest_verdicts")
    )


def count_reviews(*, session: Session) -> dict[str, int]:
    """How many verdicts are stored: all, and the corrections among them."""
    total, corrected = session.execute(
        select(
            func.count(),
            func.count().filter(REVIEWS.c.new_label != REVIEWS.c.old_label),
        ).select_from(REVIEWS)
    ).one()
    return {"reviews": int(total), "corrections": int(corrected or 0)}
