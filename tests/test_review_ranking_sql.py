"""The review page's ranking in SQL is the Python reference's, page by page, on SQLite and
PostgreSQL: whole-image labels of two model versions (one registered, one not) and a face model's
faces, with ties, uncertain rows and suspects, under every filter the page offers."""

from __future__ import annotations

import random

import pytest
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.repository import FaceRow, ImageRow, JobItemRow, ResultRow, ReviewFilters
from emolabel.review.ranking import rank_by_doubt

CLASSES = ("angry", "happy", "sad")
FACE_CLASSES = ("happy", "neutral")


def _scores(rng: random.Random, classes: tuple[str, ...]) -> dict[str, float]:
    # Two decimals: many rows tie on every key, so the tie order is checked too.
    raw = [rng.choice([1, 1, 2, 3, 5, 8]) for _ in classes]
    return {name: round(value / sum(raw), 2) for name, value in zip(classes, raw, strict=True)}


def _ledger(session: Session, seed: int) -> tuple[int, list[int]]:
    rng = random.Random(seed)
    count = 90
    rows = [ImageRow(uri=f"file:///rank/{index}.jpg", fingerprint="1-1") for index in range(count)]
    ids = list(repository.upsert_images(session=session, rows=rows).values())
    job_id = repository.create_job(session=session, source="/rank", model_version="v-a")
    repository.add_job_items(
        session=session, job_id=job_id, items=[JobItemRow(i, chunk_index=0) for i in ids]
    )
    repository.register_model(
        session=session,
        version="v-a",
        name="ranked",
        artifact_path="/nowhere/v-a.keras",
        class_names=list(CLASSES),
    )
    results = []
    for image_id in ids[:60]:
        for version in ("v-a", "v-b"):
            if version == "v-b" and rng.random() < 0.3:
                continue
            scores = _scores(rng, CLASSES)
            # Mostly the top class, sometimes not: a stored label need not be the argmax.
            label = (
                max(scores, key=scores.__getitem__) if rng.random() < 0.8 else rng.choice(CLASSES)
            )
            results.append(
                ResultRow(
                    image_id, version, label, scores[label], scores, uncertain=rng.random() < 0.15
                )
            )
    faces = []
    for image_id in ids[60:]:
        for face_index in range(rng.randint(1, 3)):
            scores = _scores(rng, FACE_CLASSES)
            label = max(scores, key=scores.__getitem__)
            faces.append(
                FaceRow(
                    image_id,
                    "v-face",
                    face_index,
                    1,
                    2,
                    30,
                    40,
                    0.99,
                    label,
                    scores[label],
                    scores,
                    uncertain=rng.random() < 0.15,
                )
            )
    repository.record_outcomes(
        session=session, job_id=job_id, results=results, failures=[], faces=faces, chunk_index=0
    )
    return job_id, ids


@pytest.mark.parametrize("seed", [1, 2])
def test_every_page_in_sql_is_the_python_ranking(
    ledger_sessions: sessionmaker[Session], seed: int
) -> None:
    with ledger_sessions.begin() as session:
        job_id, _ids = _ledger(session, seed)
    filter_sets = [
        ReviewFilters(job_id=job_id),
        ReviewFilters(job_id=job_id, model_version="v-b"),
        ReviewFilters(job_id=job_id, label="happy"),
        ReviewFilters(job_id=job_id, uncertain_only=True),
        ReviewFilters(job_id=job_id, min_confidence=0.3, max_confidence=0.6),
        ReviewFilters(job_id=job_id, model_version="v-b", changed_from="v-a"),
        ReviewFilters(job_id=job_id, label="no such label"),
    ]
    with ledger_sessions() as session:
        for filters in filter_sets:
            facets = repository.review_facets(
                session=session, job_id=job_id, model_version=filters.model_version
            )
            classes = repository.model_classes(session=session, versions=facets.versions)
            expected = rank_by_doubt(
                repository.review_items(session=session, filters=filters), facets.thresholds
            )
            for size in (7, 50):
                pages = []
                for offset in range(0, len(expected) + size, size):
                    page = repository.ranked_review_items(
                        session=session,
                        filters=filters,
                        facets=facets,
                        classes=classes,
                        offset=offset,
                        limit=size,
                    )
                    assert page.total == len(expected), filters
                    pages += page.items
                assert [item.key for item in pages] == [item.key for item in expected], filters
                assert pages == expected
    # The facets are the job's, whatever the filter: check them against the rows themselves.
    with ledger_sessions() as session:
        everything = repository.review_items(session=session, filters=ReviewFilters(job_id))
        facets = repository.review_facets(session=session, job_id=job_id)
    by_class: dict[tuple[str, str], list[float]] = {}
    for item in everything:
        by_class.setdefault((item.model_version, item.label), []).append(item.confidence)
    assert facets.thresholds.keys() == by_class.keys()
    for key, confidences in by_class.items():
        assert facets.thresholds[key] == pytest.approx(sum(confidences) / len(confidences))
    assert facets.versions == ["v-a", "v-b", "v-face"]
    # Face models' photo labels are labels of the job too (the largest face's).
    assert set(facets.labels) == {item.label for item in everything}
    assert {item.model_version for item in everything if item.face_index is not None} == {"v-face"}


def test_a_bad_page_is_refused(ledger_sessions: sessionmaker[Session]) -> None:
    with ledger_sessions() as session:
        for offset, limit in ((-1, 10), (0, 0)):
            with pytest.raises(ValueError, match="offset"):
                repository.ranked_review_items(
                    session=session,
                    filters=ReviewFilters(job_id=1),
                    facets=repository.ReviewFacets({}, {}, {}, [], []),
                    classes={},
                    offset=offset,
                    limit=limit,
                )
