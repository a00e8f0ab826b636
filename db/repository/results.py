"""The `results` table, read: what each model version labeled, for export, for the scan's
"already labeled" skip and for `--where` selections on an image's latest label.

Writing results is `db.repository.outcomes`' (a chunk's labels and failures in one go). A face
model's image has one result too: the photo-level label (its largest face's) with `face_count`,
or, for an image without a face, `face_count` 0 and no label; so the scan's skip treats a
no_face image as decided by that model version, and a confidence filter passes it over.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    Subquery,
    Text,
    and_,
    case,
    cast,
    func,
    select,
)
from sqlalchemy.orm import Session

from db.repository.base import (
    IMAGES,
    JOB_ITEMS,
    JOBS,
    RESULTS,
    id_batches,
    membership,
)
from db.repository.reviews import latest_verdicts


class ExportRow(NamedTuple):
    """One result with its image's URI, for export (a named tuple: an export makes millions,
    and a frozen dataclass's __init__ cost more than writing the row).

    `face_count` is None for a whole-image model; for a face model the faces found, the label
    the largest face's, and 0 for an image without a face (label and confidence None). The human
    label is the image's own verdict (not a face's).
    """

    image_id: int
    uri: str
    model_version: str
    label: str | None
    confidence: float | None
    scores: str  # the JSON text of {class: score}, as stored (`scores_json`)
    job_id: int | None
    created_at: dt.datetime
    face_count: int | None = None
    uncertain: bool = False
    runner_up: str | None = None
    runner_up_confidence: float | None = None
    # The latest verdict of a person on this image's label (any model version's), if any.
    human_label: str | None = None
    reviewed_by: str | None = None
    reviewed_at: dt.datetime | None = None

    @property
    def outcome(self) -> str:
        """`no_face` for a face model's image without a face, `uncertain` or `labeled`."""
        if self.face_count == 0:
            return "no_face"
        return "uncertain" if self.uncertain else "labeled"


def labeled_fingerprints(
    *, session: Session, uris: Iterable[str], model_version: str
) -> dict[str, str]:
    """uri -> fingerprint of the image version that `model_version` labeled, for labeled URIs.

    The producer skips a URI whose current fingerprint equals the one returned.
    """
    wanted = sorted(set(uris))
    found: dict[str, str] = {}
    for condition in membership(session, IMAGES.c.uri, wanted):
        query = (
            select(IMAGES.c.uri, RESULTS.c.fingerprint)
            .join(RESULTS, RESULTS.c.image_id == IMAGES.c.id)
            .where(RESULTS.c.model_version == model_version, condition)
        )
        found.update({uri: fingerprint for uri, fingerprint in session.execute(query)})
    return found


def labeled_fingerprints_by_id(
    *, session: Session, image_ids: Iterable[int], model_version: str
) -> dict[int, str]:
    """image id -> fingerprint of the image version that `model_version` labeled, for the
    labeled ones: `labeled_fingerprints` for a scan that has its images' ids already, read
    through the results' primary key alone (image id, model version)."""
    found: dict[int, str] = {}
    for condition in membership(session, RESULTS.c.image_id, sorted(set(image_ids))):
        query = select(RESULTS.c.image_id, RESULTS.c.fingerprint).where(
            condition, RESULTS.c.model_version == model_version
        )
        found.update({image_id: fingerprint for image_id, fingerprint in session.execute(query)})
    return found


def scores_json() -> ColumnElement[str]:
    """A result's scores as the JSON text the database holds, for exports that write it as it
    is: decoding each document and encoding it again was a third of an export's time. (The
    numbers are the same; PostgreSQL spells a small one 0.00001 where Python wrote 1e-05.)"""
    return cast(RESULTS.c.scores, Text)


class ExportQuery(NamedTuple):
    """An export's rows as one SELECT, its columns labeled with their export names, and the
    columns that order them; `iter_results` and `iter_ledger_rows` read it in Python, and on
    PostgreSQL `db.repository.rendered` has the server write it as CSV or JSON lines."""

    select: Select[Any]
    order_by: tuple[str, ...]


def results_query(
    *, job_id: int | None = None, model_version: str | None = None, scores_as_text: bool = True
) -> ExportQuery:
    """The results an export writes, with their image's URI and latest human verdict: of the
    images in job `job_id`'s ledger (also those it skipped as already labeled), of
    `model_version` alone, or all. The scores are the stored JSON text (`scores_json`), or with
    `scores_as_text=False` the JSON document itself."""
    verdict = latest_verdicts()
    outcome = case(
        (RESULTS.c.face_count == 0, "no_face"),
        (RESULTS.c.uncertain.is_(True), "uncertain"),
        else_="labeled",
    )
    query: Select[Any] = select(
        RESULTS.c.image_id,
        IMAGES.c.uri,
        RESULTS.c.model_version,
        RESULTS.c.label,
        RESULTS.c.confidence,
        (scores_json() if scores_as_text else RESULTS.c.scores).label("scores"),
        RESULTS.c.job_id,
        RESULTS.c.created_at,
        RESULTS.c.face_count,
        RESULTS.c.uncertain,
        RESULTS.c.runner_up,
        RESULTS.c.runner_up_confidence,
        verdict.c.new_label.label("human_label"),
        verdict.c.reviewer.label("reviewed_by"),
        verdict.c.created_at.label("reviewed_at"),
        outcome.label("outcome"),
    )
    query = query.join(IMAGES, IMAGES.c.id == RESULTS.c.image_id).outerjoin(
        verdict,
        and_(verdict.c.image_id == RESULTS.c.image_id, verdict.c.face_index.is_(None)),
    )
    query = filter_results(query, job_id=job_id, model_version=model_version)
    return ExportQuery(query, ("image_id", "model_version"))


def ordered(export: ExportQuery) -> Select[Any]:
    """The export's SELECT in its order."""
    columns = export.select.selected_columns
    return export.select.order_by(*(columns[name] for name in export.order_by))


def iter_results(
    *,
    session: Session,
    job_id: int | None = None,
    model_version: str | None = None,
    batch_size: int = 1000,
) -> Iterator[ExportRow]:
    """Stream results for export, by image id (`results_query` says which)."""
    query = ordered(results_query(job_id=job_id, model_version=model_version))
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        (image_id, uri, version, label, confidence, scores, job_id, created_at) = row[:8]
        (face_count, uncertain, runner_up, runner_up_confidence) = row[8:12]
        yield ExportRow(
            image_id, uri, version, label, confidence, scores, job_id, created_at, face_count,
            bool(uncertain), runner_up, runner_up_confidence, *row[12:15],
        )  # fmt: skip


class LedgerRow(NamedTuple):
    """One ledger row (an image in a job) for `export --state`: its state, the reason and
    message of a failed or skipped image, and the label of the job's model version if that
    version labeled the image (in this job, or earlier for an image skipped as already labeled).
    A named tuple, as `ExportRow`.
    """

    job_id: int
    image_id: int
    uri: str
    state: str
    reason: str | None
    message: str | None
    attempts: int
    model_version: str | None
    label: str | None
    confidence: float | None
    scores: str | None  # the JSON text of {class: score}, as stored (`scores_json`)
    face_count: int | None
    runner_up: str | None
    runner_up_confidence: float | None
    human_label: str | None
    reviewed_by: str | None
    reviewed_at: dt.datetime | None


def ledger_query(
    *, states: Iterable[str], job_id: int | None = None, scores_as_text: bool = True
) -> ExportQuery:
    """The ledger rows in `states` (of one job, or of every job), by job and image, with the
    label of the job's model version and the latest human verdict (as `LedgerRow`)."""
    verdict = latest_verdicts()
    query: Select[Any] = (
        select(
            JOB_ITEMS.c.job_id,
            JOB_ITEMS.c.image_id,
            IMAGES.c.uri,
            JOB_ITEMS.c.state,
            JOB_ITEMS.c.reason,
            JOB_ITEMS.c.message,
            JOB_ITEMS.c.attempts,
            JOBS.c.model_version,
            RESULTS.c.label,
            RESULTS.c.confidence,
            (scores_json() if scores_as_text else RESULTS.c.scores).label("scores"),
            RESULTS.c.face_count,
            RESULTS.c.runner_up,
            RESULTS.c.runner_up_confidence,
            verdict.c.new_label.label("human_label"),
            verdict.c.reviewer.label("reviewed_by"),
            verdict.c.created_at.label("reviewed_at"),
        )
        .join(IMAGES, IMAGES.c.id == JOB_ITEMS.c.image_id)
        .join(JOBS, JOBS.c.id == JOB_ITEMS.c.job_id)
        .outerjoin(
            RESULTS,
            and_(
                RESULTS.c.image_id == JOB_ITEMS.c.image_id,
                RESULTS.c.model_version == JOBS.c.model_version,
            ),
        )
        .outerjoin(
            verdict,
            and_(verdict.c.image_id == JOB_ITEMS.c.image_id, verdict.c.face_index.is_(None)),
        )
        .where(JOB_ITEMS.c.state.in_(sorted(set(states))))
    )
    if job_id is not None:
        query = query.where(JOB_ITEMS.c.job_id == job_id)
    return ExportQuery(query, ("job_id", "image_id"))


def iter_ledger_rows(
    *,
    session: Session,
    states: Iterable[str],
    job_id: int | None = None,
    batch_size: int = 1000,
) -> Iterator[LedgerRow]:
    """Stream the ledger rows in `states` (of one job, or of every job), by job and image: every
    file a job saw exactly once, so a job's rows per state equal its counts in `status`."""
    query = ordered(ledger_query(states=states, job_id=job_id))
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        values = list(row)
        values[3] = str(values[3])  # the ItemState enum, as its name
        yield LedgerRow(*values)


def filter_results(
    query: Select[Any], *, job_id: int | None, model_version: str | None
) -> Select[Any]:
    """An export's selection of `results` rows: with `job_id`, those of the images in the job's
    ledger (also those it skipped as already labeled); with `model_version`, that version's."""
    if job_id is not None:
        query = query.join(
            JOB_ITEMS,
            and_(JOB_ITEMS.c.image_id == RESULTS.c.image_id, JOB_ITEMS.c.job_id == job_id),
        )
    if model_version is not None:
        query = query.where(RESULTS.c.model_version == model_version)
    return query


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


def latest_uncertain(*, session: Session, image_ids: Iterable[int]) -> set[int]:
    """The images whose most recent label is `uncertain` (below its class's threshold)."""
    return _latest_label_matching(session, image_ids, lambda latest: latest.c.uncertain)


def _latest_label_matching(
    session: Session,
    image_ids: Iterable[int],
    condition: LatestLabelCondition,
) -> set[int]:
    matched: set[int] = set()
    for batch in id_batches(image_ids):
        order = func.row_number().over(
            partition_by=RESULTS.c.image_id,
            order_by=(RESULTS.c.created_at.desc(), RESULTS.c.model_version.desc()),
        )
        latest = (
            select(
                RESULTS.c.image_id,
                RESULTS.c.model_version.label("version"),
                RESULTS.c.confidence,
                RESULTS.c.uncertain,
                order.label("rank"),
            )
            .where(RESULTS.c.image_id.in_(batch))
            .subquery()
        )
        query = select(latest.c.image_id).where(latest.c.rank == 1, condition(latest))
        matched.update(session.scalars(query))
    return matched
