"""What a worker does with one chunk message, as plain functions (the Celery task is a shell).

0. Check the message (types, sizes) and then against the ledger: a message for an unknown job
   or chunk, or naming other images than the ledger put in its chunk, is refused and recorded
   (`refused_messages`); the ledger, not the message, says which images a chunk holds.
1. Count the delivery (committed first). When the worker's parent process saw a child die
   holding this chunk (`chunks.crashes`, see `worker.tasks.ChunkRequest`), split it in two and
   publish the halves, so repeated deaths narrow down to the one image that kills the process;
   that image is recorded as `poison` after `max_attempts`. Retries, redeliveries after a
   visibility timeout, republishes and clean shutdowns never count.
2. Otherwise load the active model (once per process), read + decode + predict every pending
   image of the chunk.
3. Write all outcomes in one transaction: bulk upsert of results keyed on (image, model
   version), ledger rows labeled / failed, chunk done, job done when nothing is pending.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from core.publishing import Publisher
from core.reasons import Reason
from db.delivery import MessageRefused, begin_delivery, record_refusal, split_chunk
from db.models import ChunkStatus
from db.outbox import OutgoingChunk, record_and_publish
from db.repository import (
    ChunkImage,
    FaceRow,
    FailureRow,
    NoFaceRow,
    ResultRow,
    finish_job_if_complete,
    pending_images,
    record_outcomes,
)
from training.registry import ensure_active_model
from worker.predict import ImageOutcome, StageTimes, label_face_images, label_images
from worker.state import ProcessState

logger = logging.getLogger(__name__)


@dataclass
class ChunkReport:
    """What one delivery did; the task returns it, so Flower shows it with the task."""

    job_id: int
    chunk_index: int
    images: int
    labeled: int = 0
    failed: int = 0
    # Images a face model found no face in (neither labeled nor failed).
    no_face: int = 0
    # Labeled below the label's calibrated threshold (not counted in `labeled`).
    uncertain: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    split_into: list[int] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MAX_URIS_PER_MESSAGE = 10_000
"""The most URIs a chunk message may carry (the scan's chunk_size is at most this)."""
MAX_URI_LENGTH = 8192


def check_message(job_id: object, chunk_index: object, uris: object) -> list[str]:
    """The URIs of a well-formed chunk message; raises `MessageRefused` (malformed) otherwise.

    Anyone who can write to the broker can write a message: its types and sizes are checked
    before the database is asked anything.
    """

    def refuse(why: str) -> MessageRefused:
        return MessageRefused(Reason.MALFORMED, f"malformed chunk message: {why}")

    for name, value in (("job_id", job_id), ("chunk_index", chunk_index)):
        if type(value) is not int or value < 0:
            raise refuse(f"{name} must be a non-negative integer, got {str(value)[:40]!r}")
    if not isinstance(uris, list) or not uris:
        raise refuse("uris must be a non-empty list")
    if len(uris) > MAX_URIS_PER_MESSAGE:
        raise refuse(f"{len(uris)} URIs, more than {MAX_URIS_PER_MESSAGE}")
    for uri in uris:
        if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LENGTH:
            raise refuse(f"every URI must be a string of 1 to {MAX_URI_LENGTH} characters")
    return uris


def refuse_message(
    state: ProcessState,
    refusal: MessageRefused,
    *,
    job_id: object,
    chunk_index: object,
    task_id: str | None,
) -> ChunkReport:
    """Record a refused message (the chunk the ledger knows is untouched) and say so."""
    job = job_id if type(job_id) is int else None
    index = chunk_index if type(chunk_index) is int else None
    logger.warning("refused chunk message %s (job %s, chunk %s): %s", task_id, job, index, refusal)
    with state.sessions.begin() as session:
        record_refusal(
            session=session,
            reason=refusal.reason,
            message=str(refusal),
            job_id=job,
            chunk_index=index,
            task_id=task_id,
        )
    report = ChunkReport(job or 0, index or 0, 0)
    report.note = f"refused ({refusal.reason.value}): {refusal}"
    return report


def handle_chunk(
    state: ProcessState,
    job_id: int,
    chunk_index: int,
    uris: Sequence[str],
    *,
    publish: Publisher,
) -> ChunkReport:
    """Process one delivery of a chunk; raises only on infrastructure errors (to be retried)
    and `MessageRefused` when the ledger disagrees with the message (nothing written)."""
    started = time.perf_counter()
    report = ChunkReport(job_id, chunk_index, len(uris))
    settings = state.settings
    with state.sessions.begin() as session:
        delivery = begin_delivery(
            session=session, job_id=job_id, chunk_index=chunk_index, uris=uris
        )
        if delivery.status == ChunkStatus.DONE:
            report.note = "already done: redelivered after its commit"
            return report
        active = ensure_active_model(
            session=session, models_dir=settings.models_dir, name=settings.model_name
        )
        version, artifact_path = active.version, active.artifact_path
    report.model_version = version
    pending = delivery.pending
    crashes = delivery.crashes
    if crashes > 0 and len(pending) > 1:
        report.split_into = _split(state, job_id, chunk_index, pending, publish)
        report.note = f"a process died in this chunk {crashes} time(s): split"
        logger.warning("chunk %s/%s: %s", job_id, chunk_index, report.note)
        return report
    if pending and crashes > 0 and crashes >= settings.worker.max_attempts - 1:
        message = f"the worker process died {crashes} time(s) while handling this image"
        outcomes = [ImageOutcome(pending[0].uri, reason=Reason.POISON.value, message=message)]
        logger.error("poison image %s: %s", pending[0].uri, message)
    else:
        runner = state.runner(version, artifact_path)
        times = StageTimes()
        if runner.subject == "face":
            # A face model without its detector stops here (ModelError): never whole-image labels.
            outcomes = label_face_images(
                [image.uri for image in pending],
                read=lambda uri: state.reader.read(uri, delivery.job_source),
                runner=runner,
                detector=state.detector(),
                faces=settings.faces,
                limits=settings.limits,
                pool=state.pool,
                batch_size=settings.worker.batch_size,
                times=times,
            )
        else:
            outcomes = label_images(
                [image.uri for image in pending],
                read=lambda uri: state.reader.read(uri, delivery.job_source),
                runner=runner,
                limits=settings.limits,
                pool=state.pool,
                decode_tasks=state.decode_threads,
                batch_size=settings.worker.batch_size,
                times=times,
            )
        report.stage_seconds = {
            "decode": round(times.decode, 4),
            "predict": round(times.predict, 4),
            "waiting_for_decode": round(times.waiting, 4),
        }
    write_started = time.perf_counter()
    _write(state, job_id, chunk_index, version, pending, outcomes)
    report.stage_seconds["write"] = round(time.perf_counter() - write_started, 4)
    report.no_face = sum(o.faces is not None and not o.faces.faces for o in outcomes)
    report.failed = sum(outcome.failed for outcome in outcomes)
    report.uncertain = sum(
        (o.prediction is not None and o.prediction.uncertain)
        or (o.faces is not None and o.faces.uncertain)
        for o in outcomes
    )
    report.labeled = len(outcomes) - report.failed - report.no_face - report.uncertain
    report.failed_by_reason = dict(
        Counter(o.reason or Reason.CORRUPT.value for o in outcomes if o.failed)
    )
    report.seconds = round(time.perf_counter() - started, 4)
    report.images_per_second = round(len(uris) / report.seconds, 2) if report.seconds else 0.0
    return report


def fail_chunk(
    state: ProcessState, job_id: int, chunk_index: int, error: BaseException
) -> ChunkReport:
    """Record every pending image of a chunk as failed `internal_error`, after its last retry.

    For an exception no image explains (a bug, a broken model that loads but cannot predict):
    the job finishes with the error on record instead of waiting for a republish that would
    fail the same way. `internal_error` is not a content failure, so a rescan sends them again.
    The images are the ledger's, not the message's.
    """
    message = f"chunk failed: unexpected {type(error).__name__}: {error}"[:2000]
    reason = Reason.INTERNAL_ERROR.value
    started = time.perf_counter()
    with state.sessions.begin() as session:
        pending = pending_images(session=session, job_id=job_id, chunk_index=chunk_index)
    outcomes = [ImageOutcome(image.uri, reason=reason, message=message) for image in pending]
    _write(state, job_id, chunk_index, "", pending, outcomes)
    report = ChunkReport(job_id, chunk_index, len(pending), failed=len(pending), note=message)
    report.failed_by_reason = {reason: len(pending)}
    report.stage_seconds = {"write": round(time.perf_counter() - started, 4)}
    report.seconds = report.stage_seconds["write"]
    return report


def _write(
    state: ProcessState,
    job_id: int,
    chunk_index: int,
    version: str,
    pending: Sequence[ChunkImage],
    outcomes: Sequence[ImageOutcome],
) -> None:
    images = {image.uri: image for image in pending}
    results = [
        ResultRow(
            image_id=images[outcome.uri].id,
            model_version=version,
            label=outcome.prediction.label,
            confidence=outcome.prediction.confidence,
            scores=outcome.prediction.scores,
            fingerprint=images[outcome.uri].fingerprint,
            uncertain=outcome.prediction.uncertain,
            runner_up=outcome.prediction.runner_up,
            runner_up_confidence=outcome.prediction.runner_up_confidence,
        )
        for outcome in outcomes
        if outcome.prediction is not None
    ]
    failures = [
        FailureRow(
            image_id=images[outcome.uri].id,
            reason=outcome.reason or Reason.CORRUPT.value,
            message=outcome.message,
        )
        for outcome in outcomes
        if outcome.failed
    ]
    faces = [
        FaceRow(
            image_id=images[outcome.uri].id,
            model_version=version,
            face_index=face.index,
            x=face.box[0],
            y=face.box[1],
            width=face.box[2],
            height=face.box[3],
            detector_score=face.detector_score,
            label=face.label,
            confidence=face.confidence,
            scores=face.scores,
            fingerprint=images[outcome.uri].fingerprint,
            uncertain=face.uncertain,
            runner_up=face.runner_up,
            runner_up_confidence=face.runner_up_confidence,
        )
        for outcome in outcomes
        if outcome.faces is not None
        for face in outcome.faces.faces
    ]
    no_faces = [
        NoFaceRow(
            image_id=images[outcome.uri].id,
            model_version=version,
            fingerprint=images[outcome.uri].fingerprint,
        )
        for outcome in outcomes
        if outcome.faces is not None and not outcome.faces.faces
    ]
    with state.sessions.begin() as session:
        record_outcomes(
            session=session,
            job_id=job_id,
            results=results,
            failures=failures,
            chunk_index=chunk_index,
            faces=faces,
            no_faces=no_faces,
        )
        finish_job_if_complete(session=session, job_id=job_id)


def _split(
    state: ProcessState,
    job_id: int,
    chunk_index: int,
    pending: Sequence[ChunkImage],
    publish: Publisher,
) -> list[int]:
    middle = len(pending) // 2
    halves = [pending[:middle], pending[middle:]]
    indices: list[int] = []

    def record(session: Session) -> list[OutgoingChunk]:
        indices[:] = split_chunk(
            session=session,
            job_id=job_id,
            chunk_index=chunk_index,
            parts=[[image.id for image in half] for half in halves],
        )
        return [
            OutgoingChunk(index, [image.uri for image in half])
            for index, half in zip(indices, halves, strict=True)
        ]

    # Committed before publishing: if this process dies now, the halves are recorded and never
    # published, and the reconciler sends them.
    record_and_publish(sessions=state.sessions, publish=publish, job_id=job_id, record=record)
    return indices
