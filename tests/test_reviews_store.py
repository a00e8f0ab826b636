"""Reviews on SQLite and PostgreSQL: verdicts checked against stored labels (all or nothing),
the latest verdict is the human label, face verdicts carry their box."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Review
from db.repository import FaceRow, ImageRow, JobItemRow, ResultRow, ReviewError, ReviewInput

VERSION = "v-review"
SCORES = {"happy": 0.7, "sad": 0.3}


def labeled(session: Session, count: int) -> tuple[int, list[int]]:
    rows = [ImageRow(uri=f"file:///r/{index}.jpg", fingerprint="1-1") for index in range(count)]
    ids = list(repository.upsert_images(session=session, rows=rows).values())
    job_id = repository.create_job(session=session, source="/r", model_version=VERSION)
    repository.add_job_items(
        session=session, job_id=job_id, items=[JobItemRow(i, chunk_index=0) for i in ids]
    )
    repository.record_outcomes(
        session=session,
        job_id=job_id,
        results=[ResultRow(i, VERSION, "happy", 0.7, SCORES) for i in ids[:-1]],
        failures=[],
        faces=[
            FaceRow(ids[-1], VERSION, 0, 4, 6, 30, 40, 0.99, "sad", 0.6, {"happy": 0.4, "sad": 0.6})
        ],
        chunk_index=0,
    )
    return job_id, ids


def test_verdicts_are_checked_and_the_latest_is_the_human_label(
    ledger_sessions: sessionmaker[Session],
) -> None:
    with ledger_sessions.begin() as session:
        _job_id, ids = labeled(session, 3)
    bad = [
        ReviewInput(ids[0], VERSION, "sad", "ann"),
        ReviewInput(ids[1], VERSION, "angry", "ann"),  # not a class of the model
    ]
    with ledger_sessions.begin() as session, pytest.raises(ReviewError, match="angry"):
        repository.record_reviews(session=session, reviews=bad)
    for wrong, message in [
        (ReviewInput(999_999, VERSION, "sad", "ann"), "no label"),
        (ReviewInput(ids[0], "other-version", "sad", "ann"), "no label"),
        (ReviewInput(ids[2], VERSION, "sad", "ann", face_index=3), "no face 3"),
    ]:
        with ledger_sessions.begin() as session, pytest.raises(ReviewError, match=message):
            repository.record_reviews(session=session, reviews=[wrong])
    with ledger_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Review)) == 0
    with ledger_sessions.begin() as session:
        repository.record_reviews(
            session=session,
            reviews=[
                ReviewInput(ids[0], VERSION, "sad", "ann"),
                ReviewInput(ids[1], VERSION, "happy", "ann"),
                ReviewInput(ids[2], VERSION, "happy", "bob", face_index=0),
            ],
        )
    with ledger_sessions.begin() as session:
        repository.record_reviews(
            session=session, reviews=[ReviewInput(ids[0], VERSION, "happy", "bob")]
        )
    with ledger_sessions() as session:
        labels = repository.human_labels(session=session)
        assert repository.count_reviews(session=session) == {"reviews": 4, "corrections": 2}
    by_image = {(label.image_id, label.face_index): label for label in labels}
    assert len(labels) == 3
    # The later verdict wins; an accepted label is a verdict too.
    assert (by_image[(ids[0], None)].label, by_image[(ids[0], None)].reviewer) == ("happy", "bob")
    assert not by_image[(ids[1], None)].corrected
    face_label = by_image[(ids[2], 0)]
    assert (face_label.old_label, face_label.label, face_label.box) == (
        "sad",
        "happy",
        (4, 6, 30, 40),
    )
    assert all(label.uri.startswith("file:///r/") and not label.stale for label in labels)


def test_the_review_page_can_show_what_another_version_labeled_differently(
    ledger_sessions: sessionmaker[Session],
) -> None:
    with ledger_sessions.begin() as session:
        job_id, ids = labeled(session, 4)  # VERSION: happy, happy, happy, a face (sad)
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[
                ResultRow(ids[0], "v-new", "sad", 0.8, {"happy": 0.2, "sad": 0.8}),
                ResultRow(ids[1], "v-new", "happy", 0.9, {"happy": 0.9, "sad": 0.1}),
                ResultRow(ids[2], "v-new", "sad", 0.6, {"happy": 0.4, "sad": 0.6}),
            ],
            failures=[],
        )
    with ledger_sessions() as session:
        changed = repository.review_items(
            session=session,
            filters=repository.ReviewFilters(
                job_id=job_id, model_version="v-new", changed_from=VERSION
            ),
        )
        everything = repository.review_items(
            session=session, filters=repository.ReviewFilters(job_id=job_id)
        )
    assert sorted(item.image_id for item in changed) == [ids[0], ids[2]]
    assert len(everything) == 7  # 3 + 1 face by VERSION, 3 by v-new
