"""A chunk's outcome, written in bulk: results upserted on (image, model version), a face
model's faces replaced with them, ledger rows labeled, uncertain, no_face or failed, the chunk
done.

A redelivered chunk writes no result twice: a result is rewritten only when the image's
fingerprint changed since it was labeled, an image's faces only with its result (so the same
write twice leaves one set of faces), and a labeled or no_face ledger row never turns failed.
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
from db.repository.faces import (
    FaceRow,
    NoFaceRow,
    ResultKey,
    group_faces,
    photo_face,
    replace_faces,
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
    # Below the label's calibrated threshold; the second likeliest class and its score.
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None

    def __post_init__(self) -> None:
        check_text(self.model_version, "model_version", max_length=NAME_LENGTH)
        check_text(self.label, "label", max_length=NAME_LENGTH)
        if self.runner_up is not None:
            check_text(self.runner_up, "runner_up", max_length=NAME_LENGTH)
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


@dataclass(frozen=True, slots=True)
class _PhotoRow:
    """One `results` row to upsert: a whole-image label, or a face model's photo-level one."""

    image_id: int
    model_version: str
    label: str | None
    confidence: float | None
    scores: Mapping[str, float]
    fingerprint: str | None
    face_count: int | None
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None

    @property
    def state(self) -> ItemState:
        """The ledger state this result decides."""
        if self.face_count == 0:
            return ItemState.NO_FACE
        return ItemState.UNCERTAIN if self.uncertain else ItemState.LABELED


def record_outcomes(
    *,
    session: Session,
    job_id: int,
    results: Sequence[ResultRow],
    failures: Sequence[FailureRow],
    chunk_index: int | None = None,
    faces: Sequence[FaceRow] = (),
    no_faces: Sequence[NoFaceRow] = (),
) -> int:
    """Write a chunk's labels, faces, no_face images and failures in bulk; return how many
    result rows were written.

    `results` are whole-image labels. A face model's image comes as its `faces` (every face,
    numbered from 0; the photo's result takes the largest face's label, with the face count)
    or as a `NoFaceRow` (a result with face count 0 and no label). Results are upserted on
    (image_id, model_version) and rewritten only when the image's fingerprint changed, so a
    redelivered chunk writes no result twice; an image's faces are replaced (deleted and
    inserted) exactly when its result is written, in this transaction. Ledger rows become
    labeled, no_face (as the stored result says) or failed (a labeled or no_face row never turns
    failed) and count one more attempt. With `chunk_index`, the chunk is marked done.
    """
    grouped = group_faces(faces)
    photos = [
        _PhotoRow(
            row.image_id,
            row.model_version,
            row.label,
            row.confidence,
            row.scores,
            row.fingerprint,
            None,
            row.uncertain,
            row.runner_up,
            row.runner_up_confidence,
        )
        for row in results
    ]
    for (image_id, version), rows in grouped.items():
        chosen = photo_face(rows)
        photos.append(
            _PhotoRow(
                image_id,
                version,
                chosen.label,
                chosen.confidence,
                chosen.scores,
                chosen.fingerprint,
                len(rows),
                # The photo needs a look when any of its faces does.
                any(row.uncertain for row in rows),
                chosen.runner_up,
                chosen.runner_up_confidence,
            )
        )
    photos.extend(
        _PhotoRow(row.image_id, row.model_version, None, None, {}, row.fingerprint, 0)
        for row in no_faces
    )
    _check_one_outcome_per_image(results, grouped, no_faces, failures)
    now = utc_now()
    written = _upsert_results(session=session, job_id=job_id, photos=photos, now=now)
    face_model_keys = set(grouped) | {row.key for row in no_faces}
    replace_faces(
        session=session, job_id=job_id, keys=written & face_model_keys, faces=grouped, now=now
    )
    states = _decided_states(session=session, photos=photos, written=written)
    for state in (ItemState.LABELED, ItemState.UNCERTAIN, ItemState.NO_FACE):
        _mark_decided(
            session=session,
            job_id=job_id,
            image_ids=sorted(image_id for image_id, decided in states.items() if decided is state),
            state=state,
            now=now,
        )
    _mark_failed(session=session, job_id=job_id, failures=failures, now=now)
    if chunk_index is not None:
        session.execute(
            update(CHUNKS)
            .where(CHUNKS.c.job_id == job_id, CHUNKS.c.chunk_index == chunk_index)
            .values(status=ChunkStatus.DONE)
        )
    return len(written)


def _check_one_outcome_per_image(
    results: Sequence[ResultRow],
    grouped: Mapping[ResultKey, Sequence[FaceRow]],
    no_faces: Sequence[NoFaceRow],
    failures: Sequence[FailureRow],
) -> None:
    kinds = {
        "labeled": {row.image_id for row in results},
        "given faces": {image_id for image_id, _ in grouped},
        "no_face": {row.image_id for row in no_faces},
        "failed": {row.image_id for row in failures},
    }
    names = list(kinds)
    for position, first in enumerate(names):
        for second in names[position + 1 :]:
            both = kinds[first] & kinds[second]
            if both:
                raise ValueError(f"images {sorted(both)[:10]} are both {first} and {second}")


def _upsert_results(
    *, session: Session, job_id: int, photos: Sequence[_PhotoRow], now: dt.datetime
) -> set[ResultKey]:
    latest = {(row.image_id, row.model_version): row for row in photos}
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
            for column in (
                "label",
                "confidence",
                "scores",
                "fingerprint",
                "job_id",
                "created_at",
                "face_count",
                "uncertain",
                "runner_up",
                "runner_up_confidence",
            )
        },
        where=RESULTS.c.fingerprint != new.fingerprint,
    ).returning(RESULTS.c.image_id, RESULTS.c.model_version)
    written: set[ResultKey] = set()
    for batch in batches(session, ordered, parameters_per_item=13):
        fingerprints = _fingerprints(
            session, [row.image_id for row in batch if row.fingerprint is None]
        )
        parameters = [
            {
                "image_id": row.image_id,
                "model_version": row.model_version,
                "label": row.label,
                "confidence": None if row.confidence is None else float(row.confidence),
                "scores": {str(name): float(score) for name, score in row.scores.items()},
                "fingerprint": (
                    row.fingerprint if row.fingerprint is not None else fingerprints[row.image_id]
                ),
                "job_id": job_id,
                "created_at": now,
                "face_count": row.face_count,
                "uncertain": row.uncertain,
                "runner_up": row.runner_up,
                "runner_up_confidence": row.runner_up_confidence,
            }
            for row in batch
        ]
        written.update(
            (int(image_id), str(version))
            for image_id, version in session.execute(statement, parameters)
        )
    return written


def _decided_states(
    *, session: Session, photos: Sequence[_PhotoRow], written: set[ResultKey]
) -> dict[int, ItemState]:
    """Each image's ledger state as its stored result says: labeled, uncertain or no_face.

    As written now, or, where the result was left alone (a redelivery, an unchanged file), as
    stored before: a redelivered chunk never changes what the first delivery decided.
    """
    states: dict[int, ItemState] = {}
    kept: dict[str, list[int]] = {}
    for row in photos:
        if (row.image_id, row.model_version) in written:
            states[row.image_id] = row.state
        else:
            kept.setdefault(row.model_version, []).append(row.image_id)
    for version, image_ids in kept.items():
        for batch in batches(session, sorted(set(image_ids)), parameters_per_item=1):
            query = select(RESULTS.c.image_id, RESULTS.c.face_count, RESULTS.c.uncertain).where(
                RESULTS.c.model_version == version, RESULTS.c.image_id.in_(batch)
            )
            for image_id, face_count, uncertain in session.execute(query):
                stored = _PhotoRow(image_id, version, None, None, {}, None, face_count, uncertain)
                states[int(image_id)] = stored.state
    return states


def _fingerprints(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    query = select(IMAGES.c.id, IMAGES.c.fingerprint).where(IMAGES.c.id.in_(image_ids))
    found = {image_id: fingerprint for image_id, fingerprint in session.execute(query)}
    missing = [image_id for image_id in image_ids if image_id not in found]
    if missing:
        raise NotFoundError(f"no images with ids {missing[:10]}")
    return found


def _mark_decided(
    *,
    session: Session,
    job_id: int,
    image_ids: Sequence[int],
    state: ItemState,
    now: dt.datetime,
) -> None:
    for batch in batches(session, image_ids, parameters_per_item=1):
        session.execute(
            update(JOB_ITEMS)
            .where(JOB_ITEMS.c.job_id == job_id, JOB_ITEMS.c.image_id.in_(batch))
            .values(
                state=state,
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
            # A redelivery must not undo a label or a no_face, nor touch what the producer skipped.
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
