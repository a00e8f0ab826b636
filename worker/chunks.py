"""What a worker does with one chunk message, as plain functions (the Celery task is a shell).

1. Count the delivery (committed first). More starts than finishes means a process died inside
   this chunk: split it in two and publish the halves, so repeated deaths narrow down to the one
   image that kills the process; that image is recorded as `poison` after `max_attempts`.
2. Otherwise load the active model (once per process), read + decode + predict every image.
3. Write all outcomes in one transaction: bulk upsert of results keyed on (image, model
   version), ledger rows labeled / failed, chunk done, job done when nothing is pending.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from db.models import ChunkStatus
from db.repository import (
    FailureRow,
    NotFoundError,
    ResultRow,
    begin_delivery,
    ensure_job_items,
    finish_job_if_complete,
    mark_chunk_published,
    record_outcomes,
    split_chunk,
)
from emolabel.errors import ReasonCode
from emolabel.registry import ensure_active_model
from worker.predict import ImageOutcome, StageTimes, label_images
from worker.state import ProcessState

logger = logging.getLogger(__name__)

Publish = Callable[[int, int, list[str]], str]


@dataclass
class ChunkReport:
    """What one delivery did; the task returns it, so Flower shows it with the task."""

    job_id: int
    chunk_index: int
    images: int
    labeled: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    model_version: str | None = None
    split_into: list[int] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def handle_chunk(
    state: ProcessState,
    job_id: int,
    chunk_index: int,
    uris: Sequence[str],
    *,
    retries: int,
    publish: Publish,
) -> ChunkReport:
    """Process one delivery of a chunk; raises only on infrastructure errors (to be retried)."""
    started = time.perf_counter()
    report = ChunkReport(job_id, chunk_index, len(uris))
    settings = state.settings
    with state.sessions.begin() as session:
        try:
            delivery = begin_delivery(
                session=session, job_id=job_id, chunk_index=chunk_index, size=len(uris)
            )
        except NotFoundError:
            logger.warning("refused chunk %s of unknown job %s", chunk_index, job_id)
            report.note = "unknown job: refused"
            return report
        if delivery.status == ChunkStatus.DONE:
            report.note = "already done: redelivered after its commit"
            return report
        active = ensure_active_model(
            session=session, models_dir=settings.models_dir, name=settings.model_name
        )
        version, artifact_path = active.version, active.artifact_path
    report.model_version = version
    crashes = delivery.deliveries - 1 - retries
    if crashes > 0 and len(uris) > 1:
        report.split_into = _split(state, job_id, chunk_index, list(uris), publish)
        report.note = f"a process died in this chunk {crashes} time(s): split"
        logger.warning("chunk %s/%s: %s", job_id, chunk_index, report.note)
        return report
    if crashes > 0 and crashes >= settings.worker.max_attempts - 1:
        message = f"the worker process died {crashes} time(s) while handling this image"
        outcomes = [ImageOutcome(uris[0], reason=ReasonCode.POISON.value, message=message)]
        logger.error("poison image %s: %s", uris[0], message)
    else:
        runner = state.runner(version, artifact_path)
        times = StageTimes()
        outcomes = label_images(
            uris,
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
    _write(state, job_id, chunk_index, version, outcomes)
    report.stage_seconds["write"] = round(time.perf_counter() - write_started, 4)
    report.labeled = sum(outcome.prediction is not None for outcome in outcomes)
    report.failed = len(outcomes) - report.labeled
    report.failed_by_reason = dict(
        Counter(o.reason or ReasonCode.CORRUPT.value for o in outcomes if o.prediction is None)
    )
    report.seconds = round(time.perf_counter() - started, 4)
    report.images_per_second = round(len(uris) / report.seconds, 2) if report.seconds else 0.0
    return report


def fail_chunk(
    state: ProcessState, job_id: int, chunk_index: int, uris: Sequence[str], error: BaseException
) -> ChunkReport:
    """Record every image of a chunk as failed `internal_error`, after its last retry.

    For an exception no image explains (a bug, a broken model that loads but cannot predict):
    the job finishes with the error on record instead of waiting for a republish that would
    fail the same way. `internal_error` is not a content failure, so a rescan sends them again.
    """
    message = f"chunk failed: unexpected {type(error).__name__}: {error}"[:2000]
    reason = ReasonCode.INTERNAL_ERROR.value
    outcomes = [ImageOutcome(uri, reason=reason, message=message) for uri in uris]
    started = time.perf_counter()
    _write(state, job_id, chunk_index, "", outcomes)
    report = ChunkReport(job_id, chunk_index, len(uris), failed=len(uris), note=message)
    report.failed_by_reason = {reason: len(uris)}
    report.stage_seconds = {"write": round(time.perf_counter() - started, 4)}
    report.seconds = report.stage_seconds["write"]
    return report


def _write(
    state: ProcessState,
    job_id: int,
    chunk_index: int,
    version: str,
    outcomes: Sequence[ImageOutcome],
) -> None:
    with state.sessions.begin() as session:
        images = ensure_job_items(
            session=session,
            job_id=job_id,
            chunk_index=chunk_index,
            uris=[outcome.uri for outcome in outcomes],
        )
        results = [
            ResultRow(
                image_id=images[outcome.uri].id,
                model_version=version,
                label=outcome.prediction.label,
                confidence=outcome.prediction.confidence,
                scores=outcome.prediction.scores,
                fingerprint=images[outcome.uri].fingerprint,
            )
            for outcome in outcomes
            if outcome.prediction is not None
        ]
        failures = [
            FailureRow(
                image_id=images[outcome.uri].id,
                reason=outcome.reason or ReasonCode.CORRUPT.value,
                message=outcome.message,
            )
            for outcome in outcomes
            if outcome.prediction is None
        ]
        record_outcomes(
            session=session,
            job_id=job_id,
            results=results,
            failures=failures,
            chunk_index=chunk_index,
        )
        finish_job_if_complete(session=session, job_id=job_id)


def _split(
    state: ProcessState, job_id: int, chunk_index: int, uris: list[str], publish: Publish
) -> list[int]:
    middle = len(uris) // 2
    parts = [uris[:middle], uris[middle:]]
    with state.sessions.begin() as session:
        indices = split_chunk(session=session, job_id=job_id, chunk_index=chunk_index, parts=parts)
    for index, part in zip(indices, parts, strict=True):
        task_id = publish(job_id, index, part)
        with state.sessions.begin() as session:
            mark_chunk_published(session=session, job_id=job_id, chunk_index=index, task_id=task_id)
    return indices
