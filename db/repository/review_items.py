"""What the review page reads: a job's labels one row per thing a person judges (an image for a
whole-image model, a face for a face model), the mean self-confidence per class its doubt ranking
needs, and where one thumbnail's pixels come from.

A no_face image has no label to judge and is left out. Filters are applied in SQL. The doubt
ranking is `emolabel.review.ranking`'s; `ranked_review_items` computes the same order in SQL and
returns one page of it, so a 10M-label job never leaves the database whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Subquery,
    Table,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
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


def _in_job(table: Table, job_id: int) -> ColumnElement[bool]:
    return table.c.image_id.in_(
        select(JOB_ITEMS.c.image_id).where(JOB_ITEMS.c.job_id == job_id).scalar_subquery()
    )


def _filtered(query: Select[Any], table: Any, filters: ReviewFilters) -> Select[Any]:
    query = query.where(_in_job(RESULTS, filters.job_id))
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


# A face's row in `results` (its photo's), where the filters on the photo's label apply.
_face_result = and_(
    RESULTS.c.image_id == FACES.c.image_id, RESULTS.c.model_version == FACES.c.model_version
)


def _image_labels() -> Select[Any]:
    """A whole-image label's columns as `_item` reads them, with the image's URI."""
    return select(
        RESULTS.c.image_id,
        IMAGES.c.uri,
        RESULTS.c.model_version,
        RESULTS.c.label,
        RESULTS.c.confidence,
        RESULTS.c.scores,
        RESULTS.c.uncertain,
        RESULTS.c.runner_up,
        RESULTS.c.runner_up_confidence,
    ).join(IMAGES, IMAGES.c.id == RESULTS.c.image_id)


def _face_labels() -> Select[Any]:
    """A face's label columns as `_item` reads them, with the image's URI."""
    return select(
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
    ).join(IMAGES, IMAGES.c.id == FACES.c.image_id)


def review_items(*, session: Session, filters: ReviewFilters) -> list[ReviewItem]:
    """The labels of a job's images that match `filters`, whole-image labels then faces."""
    images = _filtered(
        _image_labels().where(RESULTS.c.face_count.is_(None), RESULTS.c.label.is_not(None)),
        RESULTS,
        filters,
    ).order_by(RESULTS.c.image_id, RESULTS.c.model_version)
    faces = _filtered(
        _face_labels().join(RESULTS, _face_result),
        FACES,
        filters,
    ).order_by(FACES.c.image_id, FACES.c.model_version, FACES.c.face_index)
    items = [_item(row, None) for row in session.execute(images)]
    items += [_item(row, int(row.face_index)) for row in session.execute(faces)]
    return items


@dataclass(frozen=True, slots=True)
class ReviewFacets:
    """What the page needs of a whole job besides its rows: the doubt ranking's per-class
    thresholds, and the labels and model versions its filters offer."""

    # (model version, label) -> the mean confidence of the job's labels predicted as that class.
    thresholds: dict[tuple[str, str], float]
    # (model version, label) -> how many labels to judge it has (whole-image labels, faces),
    # and how many of them are uncertain.
    counts: dict[tuple[str, str], int]
    uncertain_counts: dict[tuple[str, str], int]
    labels: list[str]
    versions: list[str]


def review_facets(
    *, session: Session, job_id: int, model_version: str | None = None
) -> ReviewFacets:
    """A job's thresholds (of `model_version` only, if given), labels and versions.

    Over the whole job, whatever a page filters: the thresholds are the doubt ranking's per-class
    bars, and a filter must not move them. Two grouped scans (the job's results, their faces)
    give all three, where one scan each cost seconds at 10M rows.
    """
    whole_image = RESULTS.c.face_count.is_(None)
    thresholds: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    uncertain_counts: dict[tuple[str, str], int] = {}
    labels: set[str] = set()
    versions: set[str] = set()
    grouped = (
        select(
            RESULTS.c.model_version,
            RESULTS.c.label,
            whole_image.label("whole_image"),
            func.avg(RESULTS.c.confidence),
            func.count(),
            _uncertain_count(RESULTS),
        )
        .where(_in_job(RESULTS, job_id))
        .group_by(RESULTS.c.model_version, RESULTS.c.label, whole_image)
    )
    for version, label, whole, mean, count, uncertain in session.execute(grouped):
        versions.add(version)
        if label is None:
            continue
        labels.add(label)
        if whole:
            thresholds[(version, label)] = float(mean)
            counts[(version, label)] = int(count)
            uncertain_counts[(version, label)] = int(uncertain)
    faces = (
        select(
            FACES.c.model_version,
            FACES.c.label,
            func.avg(FACES.c.confidence),
            func.count(),
            _uncertain_count(FACES),
        )
        .where(_in_job(FACES, job_id))
        .group_by(FACES.c.model_version, FACES.c.label)
    )
    for version, label, mean, count, uncertain in session.execute(faces):
        labels.add(label)
        thresholds[(version, label)] = float(mean)
        counts[(version, label)] = int(count)
        uncertain_counts[(version, label)] = int(uncertain)
    if model_version is not None:
        thresholds = {key: mean for key, mean in thresholds.items() if key[0] == model_version}
        counts = {key: count for key, count in counts.items() if key[0] == model_version}
        uncertain_counts = {
            key: count for key, count in uncertain_counts.items() if key[0] == model_version
        }
    return ReviewFacets(
        thresholds=thresholds,
        counts=counts,
        uncertain_counts=uncertain_counts,
        labels=sorted(labels),
        versions=sorted(versions),
    )


def _uncertain_count(table: Table | Subquery) -> ColumnElement[Any]:
    counted: ColumnElement[Any] = func.coalesce(
        func.sum(case((table.c.uncertain.is_(True), 1), else_=0)), 0
    )
    return counted


@dataclass(frozen=True, slots=True)
class ReviewPage:
    """One page of a job's labels, most doubtful first, and how many match the filters."""

    items: list[ReviewItem]
    total: int


def ranked_review_items(
    *,
    session: Session,
    filters: ReviewFilters,
    facets: ReviewFacets,
    classes: Mapping[str, Sequence[str]],
    offset: int,
    limit: int,
) -> ReviewPage:
    """The page [offset, offset + limit) of `review_items` ranked by `rank_by_doubt`, in SQL.

    `emolabel.review.ranking` is the reference: its doubt key is spelled here in SQL over the
    stored class scores (`facets` from `review_facets` for the same job and model version
    filter, `classes` each version's class names from `model_classes`), and ties fall back to
    `review_items`' order, so both give the same page (a test holds them to it). Only the page's
    rows leave the database: at 10M labels returning them all to rank in Python took over a
    minute.

    The key puts every uncertain row before every other, so the two are ranked apart: a page
    within the uncertain rows (the first pages, what a reviewer sees first) sorts those alone,
    a page past them sorts the rest with the offset moved back. The counts come from the facets
    when the filters are only a label or a version, else from one count of the filtered rows.
    """
    if offset < 0 or limit < 1:
        raise ValueError(f"a page needs offset >= 0 and limit >= 1, not {offset} and {limit}")
    names = sorted(
        {name for known in classes.values() for name in known}
        | {name for _, name in facets.thresholds}
    )
    greatest = func.greatest if session.get_bind().dialect.name == "postgresql" else func.max

    def keys(uncertain: bool | None, skip: int, take: int) -> list[tuple[Any, ...]]:
        ranked = _ranked_union(filters, facets.thresholds, names, greatest, uncertain)
        found = session.execute(
            select(ranked.c.image_id, ranked.c.model_version, ranked.c.face_index)
            .order_by(
                ranked.c.suspect_first,
                ranked.c.below_class,
                ranked.c.margin,
                ranked.c.kind,
                ranked.c.image_id,
                ranked.c.model_version,
                ranked.c.face_index,
            )
            .offset(skip)
            .limit(take)
        )
        return [tuple(key) for key in found]

    narrowed = filters.uncertain_only or any(
        value is not None
        for value in (filters.min_confidence, filters.max_confidence, filters.changed_from)
    )
    if narrowed:
        # Counted without the doubt key: no score is extracted for a count.
        flags = union_all(
            *(
                _filtered(_judged(table).add_columns(table.c.uncertain), table, filters)
                for table in (RESULTS, FACES)
            )
        ).subquery("flags")
        total, uncertain = session.execute(select(func.count(), _uncertain_count(flags))).one()
        total, uncertain = int(total), int(uncertain)
    else:
        wanted = [
            key
            for key in facets.counts
            if filters.model_version in (None, key[0]) and filters.label in (None, key[1])
        ]
        total = sum(facets.counts[key] for key in wanted)
        uncertain = sum(facets.uncertain_counts.get(key, 0) for key in wanted)
    shown: list[tuple[Any, ...]] = []
    if offset < uncertain:
        shown += keys(True, offset, min(limit, uncertain - offset))
    if offset + limit > uncertain:
        skip = max(0, offset - uncertain)
        shown += keys(False, skip, limit - len(shown))
    return ReviewPage(items=_items_of(session, shown), total=total)


def _ranked_union(
    filters: ReviewFilters,
    thresholds: Mapping[tuple[str, str], float],
    names: Sequence[str],
    greatest: Any,
    uncertain: bool | None,
) -> Any:
    """The filtered labels to judge (whole-image labels, then faces) with their doubt key's
    columns; only the uncertain ones (True), only the others (False), or all (None)."""
    return union_all(
        *(
            _ranked(_judged(table), table, filters, thresholds, names, greatest, uncertain)
            for table in (RESULTS, FACES)
        )
    ).subquery("ranked")


def _judged(table: Table) -> Select[Any]:
    """The keys of the labels a person judges in `table` (whole-image labels in RESULTS, faces
    in FACES, joined to their photo's result for the filters), and which kind they are."""
    if table is RESULTS:
        return select(
            RESULTS.c.image_id,
            RESULTS.c.model_version,
            cast(null(), Integer).label("face_index"),
            literal(0).label("kind"),
        ).where(RESULTS.c.face_count.is_(None), RESULTS.c.label.is_not(None))
    return select(
        FACES.c.image_id, FACES.c.model_version, FACES.c.face_index, literal(1).label("kind")
    ).join(RESULTS, _face_result)


def _ranked(
    query: Select[Any],
    table: Table,
    filters: ReviewFilters,
    thresholds: Mapping[tuple[str, str], float],
    names: Sequence[str],
    greatest: Any,
    uncertain: bool | None,
) -> Select[Any]:
    """`query`'s rows filtered (and only the uncertain ones, or only the others, unless
    `uncertain` is None), with the columns of `ranking.doubt_key` from `table`'s scores.

    Each class's score is extracted once per row, in a subquery whose OFFSET keeps PostgreSQL
    from folding it into the outer query, where each of a score's four uses would extract it
    again (SQLite's json_extract parses the document on every call).
    A class missing from a row's scores counts 0 in the margin and is never a suspect, as in
    Python: scores are probabilities, so a 0 beside them moves no maximum.
    """
    extracted = [
        table.c.scores[name].as_float().label(f"score_{n}") for n, name in enumerate(names)
    ]
    query = _filtered(
        query.add_columns(table.c.label, table.c.uncertain, *extracted), table, filters
    )
    if uncertain is not None:
        query = query.where(
            table.c.uncertain.is_(True) if uncertain else table.c.uncertain.is_not(True)
        )
    inner = query.offset(0).subquery()
    version, label = inner.c.model_version, inner.c.label
    score = {name: inner.c[f"score_{n}"] for n, name in enumerate(names)}

    def best(columns: list[ColumnElement[Any]]) -> ColumnElement[Any]:
        # SQLite's one-argument max() is the aggregate, not the scalar.
        return columns[0] if len(columns) == 1 else greatest(*columns)

    own = case({name: func.coalesce(score[name], 0.0) for name in names}, value=label, else_=0.0)
    if len(names) > 1:
        others: ColumnElement[Any] = case(
            {
                name: best([func.coalesce(score[other], 0.0) for other in names if other != name])
                for name in names
            },
            value=label,
            else_=0.0,
        )
    else:
        others = literal(0.0)
    below: ColumnElement[Any] = literal(0.0)
    if thresholds:
        below = case(
            *[
                (and_(version == bar_version, label == name), own - bar)
                for (bar_version, name), bar in thresholds.items()
            ],
            else_=0.0,
        )
    suspect = or_(
        false(),
        *[
            and_(version == bar_version, label != name, score[name] >= bar)
            for (bar_version, name), bar in thresholds.items()
        ],
    )
    return select(
        inner.c.image_id,
        inner.c.model_version,
        inner.c.face_index,
        inner.c.kind,
        case((inner.c.uncertain.is_(True), 0), else_=1).label("uncertain_first"),
        case((suspect, 0), else_=1).label("suspect_first"),
        below.label("below_class"),
        (own - others).label("margin"),
    )


def _items_of(session: Session, keys: list[tuple[Any, ...]]) -> list[ReviewItem]:
    """The stored labels of `keys` (image id, model version, face index or None), in that order."""
    if not keys:
        return []
    image_ids = sorted({int(key[0]) for key in keys})
    found: dict[tuple[int, str, int | None], ReviewItem] = {}
    images: Select[Any] = _image_labels().where(RESULTS.c.image_id.in_(image_ids))
    faces: Select[Any] = _face_labels().where(FACES.c.image_id.in_(image_ids))
    for row in session.execute(images):
        if row.label is not None:
            item = _item(row, None)
            found[item.key] = item
    for row in session.execute(faces):
        item = _item(row, int(row.face_index))
        found[item.key] = item
    wanted = [(int(key[0]), str(key[1]), None if key[2] is None else int(key[2])) for key in keys]
    return [found[key] for key in wanted if key in found]


def _item(row: Any, face_index: int | None) -> ReviewItem:
    return ReviewItem(
        image_id=int(row.image_id),
        uri=row.uri,
        model_version=row.model_version,
        face_index=face_index,
        label=row.label,
        confidence=float(row.confidence),
        scores=dict(row.scores or {}),
        uncertain=bool(row.uncertain),
        runner_up=row.runner_up,
        runner_up_confidence=row.runner_up_confidence,
    )


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
