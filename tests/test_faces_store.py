"""Face-aware storage on SQLite and PostgreSQL: migration 0003 on a database with data in it,
faces written with their photo's result (never doubled, replaced on relabel), no_face counted
in the balance and skipped by a rescan, and `emolabel export` through the real command line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db import repository
from db.models import Face, ItemState, JobItem, JobStatus, Result
from db.repository import FaceRow, FailureRow, ImageRow, JobItemRow, NoFaceRow, ResultRow
from db.session import downgrade, make_engine, upgrade
from tests.support.cli import cli
from tests.support.services import PostgresServer

VERSION = "faces-v1"
SCORES = {"happy": 0.8, "sad": 0.2}


def face(image_id: int, index: int, *, size: int = 40, label: str = "happy") -> FaceRow:
    return FaceRow(
        image_id=image_id,
        model_version=VERSION,
        face_index=index,
        x=10 * index,
        y=5,
        width=size,
        height=size,
        detector_score=0.99,
        label=label,
        confidence=0.8,
        scores=SCORES,
    )


def job_with_images(session: Session, count: int) -> tuple[int, list[int]]:
    """A queued job with `count` new images pending in chunk 0."""
    rows = [
        ImageRow(uri=f"file:///photos/{index}.jpg", fingerprint="1-1") for index in range(count)
    ]
    ids = list(repository.upsert_images(session=session, rows=rows).values())
    job_id = repository.create_job(session=session, source="/photos", model_version=VERSION)
    repository.add_job_items(
        session=session, job_id=job_id, items=[JobItemRow(i, chunk_index=0) for i in ids]
    )
    repository.set_job_status(
        session=session, job_id=job_id, status=JobStatus.QUEUED, enqueued=count
    )
    return job_id, ids


def stored_faces(session: Session, image_id: int) -> list[tuple[int, str, int]]:
    query = (
        select(Face.face_index, Face.label, Face.width)
        .where(Face.image_id == image_id, Face.model_version == VERSION)
        .order_by(Face.face_index)
    )
    return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]


# --- repository -------------------------------------------------------------------------------


def test_faces_no_face_and_failures_balance_and_finish_the_job(
    ledger_sessions: sessionmaker[Session],
) -> None:
    with ledger_sessions.begin() as session:
        job_id, ids = job_with_images(session, 4)
        faces = [face(ids[0], 0, size=30, label="sad"), face(ids[0], 1, size=60), face(ids[1], 0)]
        written = repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[],
            failures=[FailureRow(ids[3], "corrupt")],
            faces=faces,
            no_faces=[NoFaceRow(ids[2], VERSION)],
            chunk_index=0,
        )
        assert written == 3
        assert repository.finish_job_if_complete(session=session, job_id=job_id)
    with ledger_sessions() as session:
        counts = repository.job_counts(session=session, job_id=job_id)
        assert (counts.labeled, counts.no_face, counts.failed, counts.pending) == (2, 1, 1, 0)
        assert counts.balanced and counts.enqueued == counts.done == 4
        photo = session.get(Result, (ids[0], VERSION))
        assert photo is not None
        # The photo's label is its largest face's, with the face count.
        assert (photo.label, photo.face_count) == ("happy", 2)
        nothing = session.get(Result, (ids[2], VERSION))
        assert nothing is not None
        assert (nothing.label, nothing.confidence, nothing.face_count) == (None, None, 0)
        assert stored_faces(session, ids[0]) == [(0, "sad", 30), (1, "happy", 60)]
        query = select(JobItem.image_id, JobItem.state).where(JobItem.job_id == job_id)
        states = {image_id: state for image_id, state in session.execute(query)}
        assert states[ids[2]] is ItemState.NO_FACE
        # A rescan by the same model version skips the no_face image as decided, too.
        uris = [f"file:///photos/{index}.jpg" for index in range(4)]
        decided = repository.labeled_fingerprints(session=session, uris=uris, model_version=VERSION)
        assert set(decided) == set(uris[:3])
        # A confidence filter has nothing to compare for a no_face image.
        below = repository.latest_confidence_below(session=session, image_ids=ids, threshold=0.9)
        assert below == {ids[0], ids[1]}


def test_a_redelivered_chunk_leaves_one_set_of_faces(
    ledger_sessions: sessionmaker[Session],
) -> None:
    with ledger_sessions.begin() as session:
        job_id, ids = job_with_images(session, 2)
    chunk = {
        "faces": [face(ids[0], 0), face(ids[0], 1)],
        "no_faces": [NoFaceRow(ids[1], VERSION)],
    }
    for _ in range(2):
        with ledger_sessions.begin() as session:
            repository.record_outcomes(
                session=session, job_id=job_id, results=[], failures=[], chunk_index=0, **chunk
            )
    # A third delivery that saw different faces (a nondeterministic detector) changes nothing:
    # the file did not change, so its result and faces stay, and the ledger says what they say.
    with ledger_sessions.begin() as session:
        written = repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[],
            failures=[],
            faces=[face(ids[1], 0)],
            no_faces=[NoFaceRow(ids[0], VERSION)],
        )
        assert written == 0
    with ledger_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Face)) == 2
        assert [index for index, _, _ in stored_faces(session, ids[0])] == [0, 1]
        counts = repository.job_counts(session=session, job_id=job_id)
        assert (counts.labeled, counts.no_face) == (1, 1)


def test_relabeling_a_changed_image_replaces_its_faces_in_one_transaction(
    ledger_sessions: sessionmaker[Session],
) -> None:
    with ledger_sessions.begin() as session:
        job_id, ids = job_with_images(session, 1)
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[],
            failures=[],
            faces=[face(ids[0], index) for index in range(3)],
        )
    changed = [
        FaceRow(**{**_fields(face(ids[0], 0, label="sad")), "fingerprint": "2-2"}),
    ]
    # A failure half-way through the write rolls the new faces back with the result: the old
    # set stays whole.
    with pytest.raises(IntegrityError), ledger_sessions.begin() as session:
        repository.record_outcomes(
            session=session, job_id=job_id, results=[], failures=[], faces=changed
        )
        session.execute(text("INSERT INTO faces (image_id) VALUES (NULL)"))
    with ledger_sessions() as session:
        assert len(stored_faces(session, ids[0])) == 3
    with ledger_sessions.begin() as session:
        written = repository.record_outcomes(
            session=session, job_id=job_id, results=[], failures=[], faces=changed
        )
        assert written == 1
    with ledger_sessions() as session:
        assert stored_faces(session, ids[0]) == [(0, "sad", 40)]
        photo = session.get(Result, (ids[0], VERSION))
        assert photo is not None and (photo.face_count, photo.fingerprint) == (1, "2-2")
    # The same image changed again, and now without a face: its faces go, no_face stays.
    with ledger_sessions.begin() as session:
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[],
            failures=[],
            no_faces=[NoFaceRow(ids[0], VERSION, fingerprint="3-3")],
        )
    with ledger_sessions() as session:
        assert stored_faces(session, ids[0]) == []
        counts = repository.job_counts(session=session, job_id=job_id)
        assert (counts.labeled, counts.no_face, counts.balanced) == (0, 1, True)


def _fields(row: FaceRow) -> dict[str, object]:
    return {name: getattr(row, name) for name in FaceRow.__dataclass_fields__}


def test_face_rows_refuse_what_would_break_the_set() -> None:
    with pytest.raises(ValueError, match="box"):
        FaceRow(**{**_fields(face(1, 0)), "width": 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numbered"):
        repository.record_outcomes(
            session=None,  # type: ignore[arg-type]  # refused before any statement
            job_id=1,
            results=[],
            failures=[],
            faces=[face(1, 0), face(1, 2)],
        )
    with pytest.raises(ValueError, match="both labeled and no_face"):
        repository.record_outcomes(
            session=None,  # type: ignore[arg-type]
            job_id=1,
            results=[ResultRow(1, VERSION, "happy", 0.8, SCORES)],
            failures=[],
            no_faces=[NoFaceRow(1, VERSION)],
        )


# --- migration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
    ],
)
def test_migration_0003_upgrades_a_database_with_data_and_downgrades(
    backend: str, postgres: PostgresServer, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else postgres.create_database()
    upgrade(url, "0002")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO images (uri, fingerprint) VALUES ('file:///a.jpg', '1-1')")
            )
            connection.execute(
                text(
                    "INSERT INTO jobs (source, options, status, enqueued)"
                    " VALUES ('/photos', '{}', 'done', 1)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO job_items (job_id, image_id, state, attempts)"
                    " VALUES (1, 1, 'labeled', 1)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO results (image_id, model_version, label, confidence, scores,"
                    " fingerprint, job_id) VALUES (1, 'v1', 'happy', 0.9, '{\"happy\": 0.9}',"
                    " '1-1', 1)"
                )
            )
        upgrade(url)
        assert "faces" in inspect(engine).get_table_names()
        sessions = sessionmaker(engine)
        with sessions.begin() as session:
            old = session.get(Result, (1, "v1"))
            assert old is not None
            assert (old.label, old.confidence, old.scores, old.face_count) == (
                "happy",
                0.9,
                {"happy": 0.9},
                None,
            )
            counts = repository.job_counts(session=session, job_id=1)
            assert (counts.labeled, counts.no_face, counts.balanced) == (1, 0, True)
            # The new state and the new table take rows.
            repository.record_outcomes(
                session=session, job_id=1, results=[], failures=[], faces=[face(1, 0)]
            )
            session.execute(text("UPDATE job_items SET state = 'no_face'"))
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text("UPDATE job_items SET state = 'bogus'"))
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text("UPDATE results SET label = NULL WHERE model_version = 'v1'"))
        downgrade(engine, "0002")
        with engine.connect() as connection:
            assert "faces" not in inspect(connection).get_table_names()
            item = connection.execute(text("SELECT state, reason FROM job_items")).one()
            assert tuple(item) == ("skipped", "no_face")
            assert connection.execute(text("SELECT count(*) FROM results")).scalar() == 2
        upgrade(url)
    finally:
        engine.dispose()


# --- export through the command line ----------------------------------------------------------


def _ledger_url(sessions: sessionmaker[Session]) -> str:
    bind = sessions.kw["bind"]
    return str(bind.url.render_as_string(hide_password=False))


def test_export_writes_a_row_per_face_and_per_no_face_image(
    ledger_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with ledger_sessions.begin() as session:
        job_id, ids = job_with_images(session, 3)
        repository.record_outcomes(
            session=session,
            job_id=job_id,
            results=[ResultRow(ids[2], "image-v1", "sad", 0.7, {"happy": 0.3, "sad": 0.7})],
            failures=[],
            faces=[face(ids[0], 0, size=30, label="sad"), face(ids[0], 1, size=60)],
            no_faces=[NoFaceRow(ids[1], VERSION)],
        )
    settings = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        database_url=_ledger_url(ledger_sessions),
    )

    rows = list(
        csv.DictReader(io.StringIO(cli(settings, "export", "--model-version", VERSION).stdout))
    )
    assert [(row["uri"][-5:], row["face_index"], row["label"], row["outcome"]) for row in rows] == [
        ("0.jpg", "0", "sad", "labeled"),
        ("0.jpg", "1", "happy", "labeled"),
        ("1.jpg", "", "", "no_face"),
    ]
    assert (rows[1]["x"], rows[1]["y"], rows[1]["width"], rows[1]["height"]) == (
        "10",
        "5",
        "60",
        "60",
    )
    assert json.loads(rows[0]["scores"]) == SCORES and rows[0]["model_version"] == VERSION

    lines = cli(settings, "export", "--format", "jsonl", "--model-version", VERSION).stdout
    records = [json.loads(line) for line in lines.splitlines()]
    assert records[1]["box"] == {"x": 10, "y": 5, "width": 60, "height": 60}
    assert records[1]["detector_score"] == 0.99 and records[1]["face_index"] == 1
    assert records[2] | {"uri": ""} == {
        "uri": "",
        "label": None,
        "confidence": None,
        "scores": {},
        "model_version": VERSION,
        "job_id": job_id,
        "outcome": "no_face",
        "runner_up": None,
        "runner_up_confidence": None,
        "human_label": None,
        "reviewed_by": None,
        "reviewed_at": None,
        "face_index": None,
        "box": None,
        "detector_score": None,
    }

    per_photo = cli(settings, "export", "--per", "photo", "--model-version", VERSION).stdout
    photos = list(csv.DictReader(io.StringIO(per_photo)))
    assert [(row["label"], row["face_count"], row["outcome"]) for row in photos] == [
        ("happy", "2", "labeled"),
        ("", "0", "no_face"),
    ]

    # A whole-image model's export: the columns it always had, then outcome, runner-up and the
    # human label with its provenance (empty: nobody reviewed it).
    image_only = cli(settings, "export", "--model-version", "image-v1").stdout
    assert image_only.splitlines()[0] == (
        "uri,label,confidence,model_version,scores,job_id,outcome,runner_up,"
        "runner_up_confidence,human_label,reviewed_by,reviewed_at"
    )
    (only,) = list(csv.reader(io.StringIO(image_only)))[1:]
    assert (
        only[1:4] + only[5:] == ["sad", "0.700000", "image-v1", str(job_id), "labeled"] + [""] * 5
    )
    assert json.loads(only[4]) == {"happy": 0.3, "sad": 0.7}
    jsonl = cli(settings, "export", "--format", "jsonl", "--model-version", "image-v1").stdout
    assert list(json.loads(jsonl)) == [  # the CSV's columns, in the same order
        "uri",
        "label",
        "confidence",
        "model_version",
        "scores",
        "job_id",
        "outcome",
        "runner_up",
        "runner_up_confidence",
        "human_label",
        "reviewed_by",
        "reviewed_at",
    ]
