"""The `faces` table: the rows a face model's outcome comes in as (`FaceRow`, `NoFaceRow`), the
photo-level label derived from them, replacing an image's faces, and reading them for export.

Faces are written by `db.repository.outcomes.record_outcomes`, with their photo's `results` row
and in its transaction: an (image, model version) whose result is (re)written gets its faces
deleted and inserted again, one whose result is left alone (a redelivered chunk, an unchanged
file) keeps the faces it has. So there is always exactly one set of faces per result.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from db.models import NAME_LENGTH
from db.repository.base import (
    FACES,
    IMAGES,
    RESULTS,
    batches,
    check_text,
)
from db.repository.results import filter_results
from db.repository.reviews import latest_verdicts

ResultKey = tuple[int, str]
"""(image_id, model_version): one `results` row, and the faces that belong to it."""


@dataclass(frozen=True, slots=True)
class FaceRow:
    """One face a face model labeled: its box in pixels of the original, EXIF-oriented image,
    the detector's score and the classifier's label, confidence and every class score.

    The faces of one image and model version are numbered 0..n-1 by `face_index` and written
    together; `fingerprint` is the version of the image that was read (None: the one in
    `images`), the same for all of them.
    """

    image_id: int
    model_version: str
    face_index: int
    x: int
    y: int
    width: int
    height: int
    detector_score: float
    label: str
    confidence: float
    scores: Mapping[str, float]
    fingerprint: str | None = None
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None

    def __post_init__(self) -> None:
        check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        check_text(self.label, "label", max_length=NAME_LENGTH)
        if self.runner_up is not None:
            check_text(self.runner_up, "runner_up", max_length=NAME_LENGTH)
        where = f"face {self.face_index} of image {self.image_id}"
        if self.face_index < 0:
            raise ValueError(f"{where}: face_index must not be negative")
        if self.x < 0 or self.y < 0 or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"{where}: box x={self.x} y={self.y} width={self.width} height={self.height}"
                " must have x, y >= 0 and a positive width and height"
            )
        if not (math.isfinite(self.confidence) and math.isfinite(self.detector_score)):
            raise ValueError(f"{where}: confidence and detector_score must be finite")
        if not all(math.isfinite(score) for score in self.scores.values()):
            raise ValueError(f"{where}: scores are not all finite: {self.scores}")
        if self.fingerprint is not None:
            check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)

    @property
    def key(self) -> ResultKey:
        return (self.image_id, self.model_version)

    @property
    def area(self) -> int:
        return self.width * self.height


@dataclass(frozen=True, slots=True)
class NoFaceRow:
    """An image in which a face model found no face: decided for that model, but not labeled."""

    image_id: int
    model_version: str
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        if self.fingerprint is not None:
            check_text(self.fingerprint, "fingerprint", max_length=NAME_LENGTH)

    @property
    def key(self) -> ResultKey:
        return (self.image_id, self.model_version)


def group_faces(faces: Sequence[FaceRow]) -> dict[ResultKey, list[FaceRow]]:
    """The faces of each (image, model version), by face index; refuses an incomplete set.

    A face given twice (the same index) keeps its last row, like results do.
    """
    latest = {(face.image_id, face.model_version, face.face_index): face for face in faces}
    grouped: dict[ResultKey, list[FaceRow]] = {}
    for key in sorted(latest):
        face = latest[key]
        grouped.setdefault(face.key, []).append(face)
    for (image_id, version), rows in grouped.items():
        indices = [face.face_index for face in rows]
        if indices != list(range(len(rows))):
            raise ValueError(
                f"faces of image {image_id} by {version} are numbered {indices[:10]}: "
                "give every face of the image, numbered from 0"
            )
        if len({face.fingerprint for face in rows}) > 1:
            raise ValueError(f"faces of image {image_id} by {version} disagree on the fingerprint")
    return grouped


def photo_face(faces: Sequence[FaceRow]) -> FaceRow:
    """The face whose label is the photo's: the largest box, then the detector's surest face,
    then the lowest index."""
    return min(faces, key=lambda face: (-face.area, -face.detector_score, face.face_index))


def replace_faces(
    *,
    session: Session,
    job_id: int,
    keys: Collection[ResultKey],
    faces: Mapping[ResultKey, Sequence[FaceRow]],
    now: dt.datetime,
) -> int:
    """Delete the faces of each (image, model version) in `keys` and insert `faces[key]`.

    Call it in the transaction that wrote those results rows; return the faces inserted.
    """
    by_version: dict[str, list[int]] = {}
    for image_id, version in sorted(keys):
        by_version.setdefault(version, []).append(image_id)
    for version, image_ids in by_version.items():
        for ids in batches(session, image_ids, parameters_per_item=1):
            session.execute(
                delete(FACES).where(FACES.c.model_version == version, FACES.c.image_id.in_(ids))
            )
    rows = [face for key in sorted(keys) for face in faces.get(key, ())]
    for batch in batches(session, rows, parameters_per_item=14):
        session.execute(
            FACES.insert(),
            [
                {
                    "image_id": face.image_id,
                    "model_version": face.model_version,
                    "face_index": face.face_index,
                    "x": int(face.x),
                    "y": int(face.y),
                    "width": int(face.width),
                    "height": int(face.height),
                    "detector_score": float(face.detector_score),
                    "label": face.label,
                    "confidence": float(face.confidence),
                    "scores": {str(name): float(score) for name, score in face.scores.items()},
                    "uncertain": face.uncertain,
                    "runner_up": face.runner_up,
                    "runner_up_confidence": face.runner_up_confidence,
                    "job_id": job_id,
                    "created_at": now,
                }
                for face in batch
            ],
        )
    return len(rows)


@dataclass(frozen=True, slots=True)
class FaceExportRow:
    """One row of a per-face export: a face, a no_face image, or a whole-image model's label.

    `face_count` is None for a whole-image model's label (the face fields are None too); 0 for a
    no_face image (label, confidence and the face fields None, scores empty).
    """

    image_id: int
    uri: str
    model_version: str
    face_count: int | None
    face_index: int | None
    x: int | None
    y: int | None
    width: int | None
    height: int | None
    detector_score: float | None
    label: str | None
    confidence: float | None
    scores: dict[str, float]
    job_id: int | None
    created_at: dt.datetime
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None
    # The latest verdict of a person on this face (on the image, for a whole-image label).
    human_label: str | None = None
    reviewed_by: str | None = None
    reviewed_at: dt.datetime | None = None

    @property
    def outcome(self) -> str:
        """`no_face` for an image without a face, `uncertain` or `labeled`."""
        if self.face_count == 0:
            return "no_face"
        return "uncertain" if self.uncertain else "labeled"


def any_face_results(
    *, session: Session, job_id: int | None = None, model_version: str | None = None
) -> bool:
    """True when the results an export selects include a face model's (faces or no_face)."""
    query = filter_results(
        select(RESULTS.c.image_id).where(RESULTS.c.face_count.is_not(None)),
        job_id=job_id,
        model_version=model_version,
    )
    return bool(session.scalar(select(exists(query))))


def iter_face_rows(
    *,
    session: Session,
    job_id: int | None = None,
    model_version: str | None = None,
    batch_size: int = 1000,
) -> Iterator[FaceExportRow]:
    """Stream the selected results one row per face, by image id, model version and face index:
    a face model's image gives a row per face (none found: one no_face row), a whole-image
    model's label one row. Selection as in `iter_results`."""
    verdict = latest_verdicts()
    query = filter_results(
        select(
            RESULTS.c.image_id,
            IMAGES.c.uri,
            RESULTS.c.model_version,
            RESULTS.c.face_count,
            RESULTS.c.label,
            RESULTS.c.confidence,
            RESULTS.c.scores,
            RESULTS.c.job_id,
            RESULTS.c.created_at,
            FACES.c.face_index,
            FACES.c.x,
            FACES.c.y,
            FACES.c.width,
            FACES.c.height,
            FACES.c.detector_score,
            FACES.c.label,
            FACES.c.confidence,
            FACES.c.scores,
            RESULTS.c.uncertain,
            RESULTS.c.runner_up,
            RESULTS.c.runner_up_confidence,
            FACES.c.uncertain,
            FACES.c.runner_up,
            FACES.c.runner_up_confidence,
            verdict.c.new_label,
            verdict.c.reviewer,
            verdict.c.created_at,
        )
        .join(IMAGES, IMAGES.c.id == RESULTS.c.image_id)
        .outerjoin(
            FACES,
            and_(
                FACES.c.image_id == RESULTS.c.image_id,
                FACES.c.model_version == RESULTS.c.model_version,
            ),
        )
        .outerjoin(
            verdict,
            and_(
                verdict.c.image_id == RESULTS.c.image_id,
                or_(
                    verdict.c.face_index == FACES.c.face_index,
                    and_(verdict.c.face_index.is_(None), FACES.c.face_index.is_(None)),
                ),
            ),
        ),
        job_id=job_id,
        model_version=model_version,
    ).order_by(RESULTS.c.image_id, RESULTS.c.model_version, FACES.c.face_index)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        yield _export_row(row)


def _export_row(row: Any) -> FaceExportRow:
    (image_id, uri, version, face_count, label, confidence, scores, job_id, created_at) = row[:9]
    (face_index, x, y, width, height, detector_score, face_label, face_confidence) = row[9:17]
    face_scores = row[17]
    result_doubt, face_doubt, verdict = row[18:21], row[21:24], row[24:27]
    if face_index is None:
        return FaceExportRow(
            image_id, uri, version, face_count, None, None, None, None, None, None,
            label, confidence, dict(scores or {}), job_id, created_at,
            bool(result_doubt[0]), *result_doubt[1:], *verdict,
        )  # fmt: skip
    return FaceExportRow(
        image_id, uri, version, face_count, face_index, x, y, width, height, detector_score,
        face_label, face_confidence, dict(face_scores), job_id, created_at,
        bool(face_doubt[0]), *face_doubt[1:], *verdict,
    )  # fmt: skip
